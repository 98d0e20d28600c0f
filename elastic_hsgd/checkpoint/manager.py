"""CheckpointManager: collective, atomic, verified checkpoints to any fsspec URL."""

from __future__ import annotations

import atexit
import json
import logging
import time
import weakref
from collections.abc import Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..averager import HierarchicalModelAverager
from .layout import CommitRecord, FileEntry, plan_retention, rank_file_name, source_rank, step_dir_name
from .state import capture, deserialize, restore, serialize
from .storage import CheckpointError, Storage, checksum_of

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Save and resume a whole training state through any fsspec URL.

    Every rank writes its own state (parameters differ between averaging points
    under local SGD); rank 0 then writes ``COMMIT.json`` with each file's
    checksum. A checkpoint without its commit record does not exist for readers,
    so a crash at any moment leaves the previous checkpoint loadable.

    Args:
        url: local path or fsspec URL (``/tmp/ckpt``, ``file://``, ``memory://``,
            ``s3://bucket/run``, ``gs://``, ``az://``).
        keep: how many committed checkpoints to keep.
        storage_options: passed to the fsspec filesystem (credentials, endpoint).
        async_save: default for :meth:`save`: stage to host memory, write in a
            background thread, and return.
        retries, retry_backoff_s: transient storage errors are retried with
            exponential backoff.
        include_rng: save each rank's RNG state (restored when the world size
            is unchanged).
        timeout: timeout of the checkpoint's own process group.

    Construction is collective when ``torch.distributed`` is initialised, and
    checks that every rank can write the URL.

    Example::

        >>> # xdoctest: +SKIP("needs a process group")
        >>> manager = CheckpointManager("s3://bucket/run-1", keep=3)
        >>> state = {"model": model, "optim": optimizer, "averager": averager}
        >>> start = (manager.load_latest(state) or -1) + 1
        >>> for step in range(start, steps):
        ...     train_step()
        ...     if step % 100 == 0:
        ...         manager.save(step, state)
    """

    def __init__(
        self,
        url: str,
        *,
        keep: int = 3,
        storage_options: dict[str, Any] | None = None,
        async_save: bool = False,
        retries: int = 4,
        retry_backoff_s: float = 0.2,
        include_rng: bool = True,
        timeout: timedelta = timedelta(minutes=10),
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} must be an int >= 1 (how many checkpoints to keep).")
        self.url = url
        self.keep = keep
        self.async_save = async_save
        self.include_rng = include_rng
        self.storage = Storage(url, storage_options, retries=retries, backoff_s=retry_backoff_s)
        if dist.is_available() and dist.is_initialized():
            # A group of its own: async saves run collectives from a background
            # thread, and gloo lets them coordinate on CPU even when training uses NCCL.
            self._group: dist.ProcessGroup | None = dist.new_group(backend="gloo", timeout=timeout)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self._group, self.rank, self.world_size = None, 0, 1
        self.last_loaded: CommitRecord | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[None]] | None = None
        # Host buffers of async saves, reused: a save starts only after the previous one finished.
        self._staging: dict[tuple, Any] = {}

        try:
            self.storage.check_writable()
            error = None
        except CheckpointError as exc:
            error = str(exc)
        self._raise_if_any(self.all_gather_object(error), "checkpoint storage check")
        atexit.register(_wait_at_exit, weakref.ref(self))

    # -- collectives -------------------------------------------------------

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, over the checkpoint's own gloo group."""
        if self._group is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    @staticmethod
    def _raise_if_any(errors: list[str | None], what: str) -> None:
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed:
            detail = "; ".join(f"rank {rank}: {e}" for rank, e in failed[:4])
            raise CheckpointError(f"{what} failed on {len(failed)} rank(s): {detail}")

    # -- saving ------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any], *, blocking: bool | None = None) -> None:
        """Save ``state`` as checkpoint ``step``. Collective over the world.

        ``state`` maps names to objects with ``state_dict()``/``load_state_dict()``
        (modules, optimizers, the averager, schedulers) or to plain values.
        With ``blocking=False`` (or ``async_save=True``) the state is staged to
        host memory and written in the background; the next save, :meth:`wait`,
        :meth:`close` or interpreter exit waits for it and raises if it failed.
        """
        step_dir_name(step)  # validates step before anything is written
        self.wait()
        background = self.async_save if blocking is None else not blocking
        payload = capture(state, include_rng=self.include_rng, stage=background, pool=self._staging)
        averager = next((obj.state_dict() for obj in state.values() if isinstance(obj, HierarchicalModelAverager)), None)
        extra = {"entries": sorted(state)}
        if not background:
            self._write_and_commit(step, payload, averager, extra)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elastic-hsgd-ckpt")
        self._pending = (step, self._executor.submit(self._write_and_commit, step, payload, averager, extra))

    def wait(self) -> None:
        """Block until a pending asynchronous save is committed; raise if it failed."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        try:
            future.result()
        except Exception as exc:
            raise CheckpointError(f"asynchronous save of step {step} to {self.url} failed: {exc}") from exc

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _write_and_commit(self, step: int, payload: dict[str, Any], averager: dict | None, extra: dict) -> None:
        started = time.perf_counter()
        step_dir = self.storage.path(step_dir_name(step))
        error = None
        if self.rank == 0 and self.storage.exists(step_dir):
            # A crashed earlier attempt at this step, or a step redone after a
            # fall-back: its old commit must not vouch for the new files.
            try:
                self.storage.remove_tree(step_dir)
            except Exception as exc:  # noqa: BLE001
                error = f"cannot clear {step_dir}: {exc!r}"
        self._raise_if_any(self.all_gather_object(error), f"checkpoint of step {step}")

        name = rank_file_name(self.rank)
        try:
            digest, nbytes = self.storage.write_file(f"{step_dir}/{name}", serialize(payload))
            del payload
            written: tuple[str, str, int] | None = (name, digest, nbytes)
            error = None
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
            written, error = None, f"{type(exc).__name__}: {exc}"
        outcomes = self.all_gather_object((written, error))
        self._raise_if_any([e for _, e in outcomes], f"writing checkpoint of step {step} (the previous checkpoint is intact)")

        commit_error = None
        if self.rank == 0:
            record = CommitRecord(
                step=step,
                world_size=self.world_size,
                files=tuple(FileEntry(*w) for w, _ in outcomes),
                unix_time=time.time(),
                averager=averager,
                extra=extra,
            )
            try:
                self.storage.write_atomic(self.storage.commit_path(step), json.dumps(record.to_json(), indent=1).encode())
            except Exception as exc:  # noqa: BLE001
                commit_error = f"{type(exc).__name__}: {exc}"
            else:
                self._apply_retention(step)
        self._raise_if_any(self.all_gather_object(commit_error), f"committing checkpoint of step {step}")
        if self.rank == 0:
            logger.info(
                "checkpoint step %d committed to %s: %d ranks, %.1f MB per rank, %.2f s",
                step,
                self.url,
                self.world_size,
                sum(w[2] for w, _ in outcomes) / self.world_size / 1e6,
                time.perf_counter() - started,
            )

    def _apply_retention(self, just_committed: int) -> None:
        try:
            drop_committed, drop_partial = plan_retention(self.steps(), self.storage.step_dirs(), self.keep, just_committed)
            for step in drop_committed + drop_partial:
                # The commit record goes first, so a half-deleted step is never "committed".
                step_dir = self.storage.path(step_dir_name(step))
                if step in drop_committed:
                    self.storage.fs.rm_file(self.storage.commit_path(step))
                self.storage.remove_tree(step_dir)
                logger.info("deleted %s checkpoint step %d", "old" if step in drop_committed else "partial", step)
        except Exception as exc:  # noqa: BLE001 - retention must never fail a committed save
            logger.warning("could not apply retention (keep=%d) at %s: %r", self.keep, self.url, exc)

    # -- reading -----------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return self.storage.committed_steps()

    def commit_record(self, step: int) -> CommitRecord:
        """The parsed commit record of a committed step."""
        try:
            raw = self.storage.read_file(self.storage.commit_path(step))
        except FileNotFoundError:
            raise CheckpointError(f"no committed checkpoint of step {step} at {self.url}; committed: {self.steps()}") from None
        try:
            return CommitRecord.from_json(json.loads(raw))
        except ValueError as exc:
            raise CheckpointError(f"commit record of step {step} at {self.url} is unreadable: {exc}") from exc

    def _fetch(self, step: int) -> tuple[CommitRecord | None, dict[str, Any] | None, str | None]:
        """Read, verify and decode the file this rank loads from ``step``."""
        try:
            record = self.commit_record(step)
            entry = record.file_for_rank(source_rank(self.rank, record.world_size))
            data = self.storage.read_file(self.storage.path(step_dir_name(step), entry.name))
            if len(data) != entry.bytes:
                raise CheckpointError(f"{entry.name} is truncated: {len(data)} bytes, commit record says {entry.bytes}")
            if checksum_of(data) != entry.checksum:
                raise CheckpointError(f"{entry.name} is corrupt: its checksum differs from the commit record")
            try:
                payload = deserialize(data)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{entry.name} was refused by the safe loader: {exc}") from exc
            return record, payload, None
        except Exception as exc:  # noqa: BLE001 - reported collectively
            return None, None, f"{type(exc).__name__}: {exc}"

    def load(self, step: int, state: MutableMapping[str, Any]) -> int:
        """Load checkpoint ``step`` into ``state``. Collective; raises if any rank cannot."""
        self.wait()
        record, payload, error = self._fetch(step)
        self._raise_if_any(self.all_gather_object(error), f"loading checkpoint step {step} from {self.url}")
        assert record is not None and payload is not None
        self._restore(record, payload, state)
        return step

    def load_latest(self, state: MutableMapping[str, Any]) -> int | None:
        """Load the newest committed checkpoint that verifies; ``None`` if there is none.

        A corrupt, truncated or refused newest checkpoint is skipped with a
        warning, falling back to the one before. Ranks agree on the step.
        """
        self.wait()
        candidates = self.all_gather_object(self.steps() if self.rank == 0 else None)[0]
        for step in reversed(candidates):
            record, payload, error = self._fetch(step)
            errors = self.all_gather_object(error)
            if not any(errors):
                assert record is not None and payload is not None
                self._restore(record, payload, state)
                return step
            reasons = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
            logger.warning("checkpoint step %d at %s is unusable, falling back to an older one: %s", step, self.url, reasons)
        return None

    def _restore(self, record: CommitRecord, payload: dict[str, Any], state: MutableMapping[str, Any]) -> None:
        same_world = record.world_size == self.world_size
        restore(state, payload, restore_rng=same_world)
        self.last_loaded = record
        if self.rank == 0:
            logger.info(
                "loaded checkpoint step %d from %s (world size %d -> %d%s)",
                record.step,
                self.url,
                record.world_size,
                self.world_size,
                "" if same_world else f"; rank r loads saved rank r % {record.world_size}, RNG not restored",
            )


def _wait_at_exit(ref: "weakref.ref[CheckpointManager]") -> None:
    manager = ref()
    if manager is None:
        return
    try:
        manager.close()
    except Exception:  # noqa: BLE001 - nothing left to raise to at exit
        logger.exception("a pending checkpoint save failed at exit")
