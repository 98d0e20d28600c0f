"""The durable tier: every rank's file and one commit record at any fsspec URL.

::

    <url>/step_000000001200/rank_00000.safetensors    one file per rank, written by that rank
    <url>/step_000000001200/COMMIT.json               written last, by rank 0

A save clears the step's folder (rank 0), writes every rank's file, agrees on
the outcome and then commits (rank 0) and applies retention, in the caller's
thread or in a background thread. Every failure is agreed: all ranks raise the
same :class:`~..storage.CheckpointError` at once.

Example::

    >>> # xdoctest: +SKIP("the CheckpointManager builds it")
    >>> tier = CloudTier(Storage("s3://bucket/run"), Peers.own_gloo_group(timedelta(minutes=10), CheckpointError), keep=3)
    >>> tier.save(100, capture(state), entries=None, extra=None)
    >>> sorted(tier.held_steps())
    [100]
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ...collectives import Peers, describe
from ..background import BackgroundSaver
from ..commit import Unusable, apply_retention, decode, parse_commit_record, read_verified, remove_step, write_commit_record
from ..layout import CommitRecord, FileEntry, rank_file_name, step_dir_name
from ..state import copy_to_cpu, serialize
from ..storage import CheckpointError, Storage
from . import StepReader

logger = logging.getLogger(__name__)


class CloudTier:
    """Checkpoints of every rank at one URL, committed by rank 0; see the module docstring.

    ``peers`` are the checkpoint's own group (shared with the manager, which
    owns and releases it). Construction is collective: every rank checks that
    it can write ``storage``.
    """

    name = "cloud"

    def __init__(self, storage: Storage, peers: Peers, *, keep: int) -> None:
        self.storage = storage
        self.url = storage.url
        self.keep = keep
        # The step this run last loaded or saved: retention supersedes newer ones.
        self.previous: int | None = None
        self._peers = peers
        self._saver = BackgroundSaver("elastic-hsgd-ckpt")
        # Host buffers of background saves, reused: a save starts only after the previous one finished.
        self._staging: dict[tuple, Any] = {}
        peers.raise_if_any(peers.gather(storage.writable_error()), "checkpoint storage check")

    # -- saving ------------------------------------------------------------

    def save(
        self, step: int, payload: dict[str, Any], entries: dict[str, Any] | None, extra: dict[str, Any] | None, *, background: bool = False
    ) -> None:
        """Write and commit ``payload`` as step ``step``. Collective.

        With ``background``, the payload is first copied to reused host
        buffers, and written in the save thread; :meth:`wait` raises if it failed.
        """
        if not background:
            self._write_and_commit(step, payload, entries, extra)
            return
        payload = copy_to_cpu(payload, self._staging)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the non_blocking copies must land before writing
        self._saver.submit(step, self._write_and_commit, step, payload, entries, extra)

    def wait(self) -> None:
        """Block until a pending background save is committed; raise if it failed."""
        self._saver.wait(self._raise_failed)

    def _raise_failed(self, step: int, exc: Exception) -> None:
        raise CheckpointError(f"asynchronous save of step {step} to {self.url} failed: {exc}") from exc

    def close(self) -> None:
        """Wait for a pending save, then stop the save thread (also when the save failed)."""
        try:
            self.wait()
        finally:
            self._saver.close()

    def _write_and_commit(self, step: int, payload: dict[str, Any], entries: dict[str, Any] | None, extra: dict[str, Any] | None) -> None:
        started = time.perf_counter()
        step_dir = self.storage.path(step_dir_name(step))

        def clear() -> None:
            # A crashed earlier attempt at this step, or a step redone after a
            # fall-back: its old commit must not vouch for the new files.
            if self.storage.exists(step_dir):
                remove_step(self.storage, step)

        self._peers.on_rank0(f"clearing {step_dir} for checkpoint of step {step}", clear)

        name = rank_file_name(self._peers.rank)
        try:
            digest, nbytes = self.storage.write_file(f"{step_dir}/{name}", serialize(payload))
            del payload
            written: tuple[str, str, int] | None = (name, digest, nbytes)
            error = None
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
            written, error = None, describe(exc)
        outcomes = self._peers.gather((written, error))
        self._peers.raise_if_any([e for _, e in outcomes], f"writing checkpoint of step {step} (the previous checkpoint is intact)")

        def commit() -> None:
            files = tuple(FileEntry(*w) for w, _ in outcomes)
            record = CommitRecord(step=step, world_size=self._peers.world_size, files=files, unix_time=time.time(), entries=entries, extra=extra)
            write_commit_record(self.storage, record)
            apply_retention(self.storage, self.keep, step, self.previous)

        self._peers.on_rank0(f"committing checkpoint of step {step}", commit)
        self.previous = step
        if self._peers.rank == 0:
            logger.info(
                "checkpoint step %d committed to %s: %d ranks, %.1f MB per rank, %.2f s",
                step,
                self.url,
                self._peers.world_size,
                sum(w[2] for w, _ in outcomes) / self._peers.world_size / 1e6,
                time.perf_counter() - started,
            )

    # -- reading -----------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, oldest first (this rank's own listing; not collective)."""
        return self.storage.committed_steps()

    def held_steps(self) -> set[int]:
        """Committed steps as rank 0 lists them, shared with every rank (collective)."""
        return set(self._peers.on_rank0(f"listing checkpoints at {self.url}", self.storage.committed_steps))

    def commit_record(self, step: int) -> CommitRecord:
        """The parsed commit record of a committed step; :class:`~..commit.Unusable` if it is missing or malformed."""
        try:
            raw = self.storage.read_file(self.storage.commit_path(step))
        except FileNotFoundError:
            raise Unusable(f"no committed checkpoint of step {step} at {self.url}") from None
        try:
            return parse_commit_record(raw)
        except (ValueError, RecursionError) as exc:
            raise Unusable(f"commit record of step {step} at {self.url} is unreadable: {exc}") from exc

    def reader(self, step: int) -> StepReader:
        """Step ``step``: every rank reads its commit record, agreed (collective); files are read on fetch."""
        error = None
        try:
            record = self.commit_record(step)
        except Exception as exc:  # noqa: BLE001 - agreed below
            error = exc
        self._peers.agree(error, f"loading checkpoint step {step} from {self.url}", soft=Unusable)
        return StepReader(record, lambda saved_rank: self._fetch(record, saved_rank), self.name, self.url)

    def _fetch(self, record: CommitRecord, saved_rank: int) -> dict[str, Any]:
        """Read, verify and decode one saved rank's file; :class:`~..commit.Unusable` if it does not verify."""
        entry = record.file_for_rank(saved_rank)
        path = self.storage.path(step_dir_name(record.step), entry.name)
        return decode(read_verified(self.storage, path, entry), entry.name)

    def warn_unusable(self, step: int, error: Exception) -> None:
        """The cloud is the last tier asked: say that an older step is tried next (rank 0 only)."""
        if self._peers.rank == 0:  # one copy in a torchrun log
            logger.warning("checkpoint step %d at %s is unusable, falling back to an older one: %s", step, self.url, error)

    def loaded(self, step: int) -> None:
        """Retention after the next save supersedes committed steps past ``step``."""
        self.previous = step

    def resumed(self, step: int | None) -> None:
        """Nothing to do: retention at the next save cleans up."""
