"""The durable tier: every rank's file and one commit record at any fsspec URL.

::

    <url>/step_000000001200/rank_00000.safetensors    one file per rank, written by that rank
    <url>/step_000000001200/COMMIT.json               written last, by rank 0

A save writes every rank's file, agrees on the outcome and then commits
(rank 0) and applies retention, in the caller's thread or in a background
thread. Every failure is agreed: all ranks raise the same
:class:`~..storage.CheckpointError` at once.

**Nothing committed is lost.** Re-saving a committed step writes the new files
beside the old ones (``rank_00000.<tag>.safetensors``) and replaces the commit
record atomically, then deletes the old files, so a crash at any moment leaves
the old or the new version committed. A run that never loaded (nor saved)
refuses to save where committed steps exist, unless ``overwrite``. A load
abandons the committed steps newer than the one loaded (they are marked
``ABANDONED`` at once, so a restart does not go back to them, and deleted at
the next save); steps another writer commits later are ordinary, subject only
to ``keep``.

With a local tier, the tier keeps the run's id at ``<url>/RUN_ID``
(:mod:`..run_identity`), created on the first save or load; node-local steps
carry it.

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
import uuid
from typing import Any

import torch

from ...collectives import Peers, describe
from ..background import BackgroundSaver
from ..commit import (
    Unusable, apply_retention, decode, mark_abandoned, parse_commit_record, read_verified, remove_step, remove_unreferenced,
    unmark_abandoned, write_commit_record,
)
from ..layout import ABANDONED_NAME, COMMIT_NAME, CommitRecord, FileEntry, rank_file_name, rank_file_tag, step_dir_name
from ..run_identity import RunStamp, ensure_run_id
from ..state import copy_to_cpu, serialize
from ..storage import CheckpointError, Storage
from . import StepReader

logger = logging.getLogger(__name__)


class CloudTier:
    """Checkpoints of every rank at one URL, committed by rank 0; see the module docstring.

    ``peers`` are the checkpoint's own group (shared with the manager, which
    owns and releases it). Construction is collective: every rank checks that
    it can write ``storage``. ``overwrite``: a run that never loaded may save
    over the location's committed steps (those newer than its first save are
    then abandoned). ``run_identity``: keep the run id (a local tier stamps its steps with it).
    """

    name = "cloud"

    def __init__(self, storage: Storage, peers: Peers, *, keep: int, overwrite: bool = False, run_identity: bool = False) -> None:
        self.storage = storage
        self.url = storage.url
        self.keep = keep
        self.overwrite = overwrite
        # The step this run last loaded or saved.
        self.previous: int | None = None
        # Whether the run has a place in the location's timeline: it loaded (or looked), saved, or continue_from().
        self.positioned = False
        # Committed steps this run left behind when it loaded: deleted at its next save.
        self.abandoned: set[int] = set()
        self._saved: set[int] = set()  # steps this run committed since it last loaded
        self._listed: set[int] = set()  # the committed steps at the last listing (held_steps)
        self.newest: int | None = None  # the newest committed step this run knows of (for local stamps)
        self.run_identity = run_identity
        self._run_id: str | None = None
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
        A run that has not loaded raises :class:`~..storage.CheckpointError`
        where committed steps exist (see the class); collective.
        """
        self._check_position(step)
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

    def _check_position(self, step: int) -> None:
        """Before the first save of a run that never loaded: refuse to mix its steps with the location's. Collective."""
        if self.positioned and (self._run_id is not None or not self.run_identity):
            return
        found = sorted(self._list())
        if not self.positioned:
            if found and not self.overwrite:
                raise CheckpointError(
                    f"refusing to save step {step} to {self.url}: it holds committed steps (newest: step {found[-1]}) "
                    "and this CheckpointManager has not loaded any, so a restart could resume another run's step, "
                    "and retention would delete them. Resume first (manager.load_latest(state) or "
                    "elastic_hsgd.elastic.resume; after a torchft heal, manager.continue_from(step)), use another "
                    "URL, or pass CheckpointManager(..., overwrite=True) to replace that timeline (its steps newer "
                    f"than {step} are deleted)."
                )
            self.abandoned = {s for s in found if s > step}
            self.positioned = True

    def _prepare_folder(self, step: int) -> str | None:
        """Rank 0: the tag of a re-save's files, or ``None`` (a new step; a partial or abandoned folder is cleared)."""
        names = set(self.storage.list_names(self.storage.path(step_dir_name(step))))
        if COMMIT_NAME in names and ABANDONED_NAME not in names and step not in self.abandoned:
            return uuid.uuid4().hex[:8]  # committed: keep it until the new version's record replaces its own
        if names:
            # A crashed earlier attempt, or an abandoned version: nothing to keep,
            # and its old commit must not vouch for the new files.
            remove_step(self.storage, step)
        return None

    def _remove_attempt(self, step: int, tag: str) -> None:
        """Rank 0, after a failed re-save: delete the files it wrote beside the committed version (best effort)."""
        step_dir = self.storage.path(step_dir_name(step))
        try:
            for name in self.storage.list_names(step_dir):
                if rank_file_tag(name) == tag:
                    self.storage.rm_file(f"{step_dir}/{name}")
        except Exception as exc:  # noqa: BLE001 - the committed version is intact either way
            logger.warning("could not delete the files of the failed re-save of step %d at %s: %r", step, step_dir, exc)

    def _write_and_commit(self, step: int, payload: dict[str, Any], entries: dict[str, Any] | None, extra: dict[str, Any] | None) -> None:
        started = time.perf_counter()
        step_dir = self.storage.path(step_dir_name(step))
        tag = self._peers.on_rank0(f"preparing {step_dir} for checkpoint of step {step}", lambda: self._prepare_folder(step))

        name = rank_file_name(self._peers.rank, tag=tag)
        try:
            digest, nbytes = self.storage.write_file(f"{step_dir}/{name}", serialize(payload))
            del payload
            written: tuple[str, str, int] | None = (name, digest, nbytes)
            error = None
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
            written, error = None, describe(exc)
        outcomes = self._peers.gather((written, error))
        if tag is not None and self._peers.rank == 0 and any(e for _, e in outcomes):
            self._remove_attempt(step, tag)
        self._peers.raise_if_any([e for _, e in outcomes], f"writing checkpoint of step {step} (the previous checkpoint is intact)")

        def commit() -> None:
            files = tuple(FileEntry(*w) for w, _ in outcomes)
            record = CommitRecord(step=step, world_size=self._peers.world_size, files=files, unix_time=time.time(), entries=entries, extra=extra)
            try:
                write_commit_record(self.storage, record)
            except Exception:
                if tag is not None:
                    self._remove_attempt(step, tag)
                raise
            if tag is not None:
                try:
                    remove_unreferenced(self.storage, record)
                except Exception as exc:  # noqa: BLE001 - the new version is committed; leftovers go with the step
                    logger.warning("step %d re-saved, but its replaced files at %s could not be deleted: %r", step, step_dir, exc)
            abandoned = self.abandoned | {s for s in self._saved if s > step}
            apply_retention(self.storage, self.keep, step, abandoned=abandoned - {step})

        self._peers.on_rank0(f"committing checkpoint of step {step}", commit)
        self.previous = step
        self.abandoned.discard(step)
        self._saved.add(step)
        self.newest = step if self.newest is None else max(self.newest, step)
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

    def _list(self) -> set[int]:
        """Committed steps as rank 0 lists them, shared with every rank (with ``run_identity``, the run id first). Collective."""

        def listing() -> tuple[str | None, list[int]]:
            run_id = self._run_id or (ensure_run_id(self.storage) if self.run_identity else None)
            return run_id, self.storage.committed_steps()

        self._run_id, steps = self._peers.on_rank0(f"listing checkpoints at {self.url}", listing)
        self._listed = set(steps)
        if steps:
            self.newest = max(steps) if self.newest is None else max(self.newest, max(steps))
        return set(steps)

    def held_steps(self) -> set[int]:
        """Committed steps as rank 0 lists them (abandoned ones left out), shared with every rank (collective)."""
        return self._list()

    def run_stamp(self) -> RunStamp:
        """This run's identity for a local commit record. Collective the first time (it lists the location)."""
        if self._run_id is None:
            self.run_identity = True
            self._list()
        assert self._run_id is not None
        return RunStamp(self.storage.fs.unstrip_protocol(self.storage.root), self._run_id, self.newest)

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
        """The run continues from ``step``: the committed steps newer than it (as listed before the load) are
        abandoned, marked at once, deleted at the next save; marked ones up to it are its past again. Collective."""
        self._continue_from(step, {s for s in self._listed if s > step})

        def mark() -> None:
            unmark_abandoned(self.storage, step)
            mark_abandoned(self.storage, sorted(self.abandoned), step)

        self._mark(step, mark)

    def resumed(self, step: int | None) -> None:
        """:meth:`~..manager.CheckpointManager.load_latest` chose ``step``; ``None``: every step listed was unusable
        (abandoned, like the newer steps of a load). Collective."""
        if step is None:
            self._continue_from(None, set(self._listed))
            self._mark(None, lambda: mark_abandoned(self.storage, sorted(self.abandoned), None))

    def continue_from(self, step: int) -> None:
        """The run's state is step ``step`` of this location's timeline, obtained elsewhere (a torchft heal):
        nothing is abandoned, and saves may go on here."""
        self._continue_from(step, set())

    def _continue_from(self, step: int | None, abandoned: set[int]) -> None:
        self.previous, self.positioned, self.abandoned, self._saved = step, True, abandoned, set()
        below = [s for s in self._listed if step is not None and s <= step]
        self.newest = max(below) if below else None

    def _mark(self, step: int | None, fn: Any) -> None:
        if not self.abandoned and step is None:
            return
        try:
            self._peers.on_rank0(f"marking the checkpoints after step {step} at {self.url} abandoned", fn)
        except CheckpointError as exc:  # this run still deletes them at its next save
            logger.warning("%s", exc)
