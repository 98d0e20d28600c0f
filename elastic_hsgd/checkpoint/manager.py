"""CheckpointManager: collective, atomic, verified checkpoints to any fsspec URL."""

from __future__ import annotations

import atexit
import json
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

import torch
from . import replicas
from .layout import CommitRecord, FileEntry, plan_retention, rank_file_name, saved_ranks_to_read, step_dir_name, structure_rank, summarize
from .local_tier import LocalTier
from .state import RNG_KEY, capture, copy_to_cpu, deserialize, restore, serialize
from .storage import CheckpointError, RetryPolicy, Storage
from ..process_groups import release_at_exit, release_group

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CheckpointManager:
    """Save and resume a whole training state through any fsspec URL.

    Every rank writes its own state (parameters differ between averaging points
    under local SGD) as a safetensors file; rank 0 then writes ``COMMIT.json``
    with each file's checksum. A checkpoint without its commit record does not
    exist for readers, so a crash at any moment leaves the previous checkpoint
    loadable.

    **Resume convention.** A checkpoint's label is the number of optimizer
    steps done when it was saved. :meth:`load_latest` returns that label, or
    ``None`` on a fresh start, and the loop starts at it (a step-0 checkpoint
    is a valid label: test ``is None``, not truthiness).

    **Retention.** After a save commits, the newest ``keep`` committed steps
    up to it are kept; the save itself is never deleted. Committed steps newer
    than it, or newer than the step this run last loaded or saved (a fall-back
    past a corrupt newest step, or :meth:`load` of an older step), belong to
    an abandoned timeline and are deleted, so a restart resumes from the run's
    own newest save.

    **Storage calls** all go through one :class:`~.storage.RetryPolicy`
    (exponential backoff with jitter, ``retries`` and a ``retry_deadline_s``
    limit) and every failure is agreed collectively: all ranks raise the same
    :class:`CheckpointError` at once, never one rank while the others wait.

    Args:
        url: local path or fsspec URL (``/tmp/ckpt``, ``file://``, ``memory://``,
            ``s3://bucket/run``, ``gs://``, ``az://``). Glob characters in it are literal.
        keep: how many committed checkpoints to keep.
        storage_options: passed to the fsspec filesystem (credentials, endpoint).
        async_save: default for :meth:`save`: stage to host memory, write in a
            background thread, and return.
        retries, retry_backoff_s, retry_deadline_s: the retry policy of every
            storage call (attempts after the first, base delay, total time).
        include_rng: save each rank's RNG state (restored when the world size
            is unchanged).
        timeout: timeout of the checkpoint's own process group.
        every: cloud cadence of :meth:`maybe_save` (a save at every step divisible by it).
        local_url: a node-local folder or fsspec URL (``/dev/shm/ckpt``, an
            ``emptyDir``) for the local tier (:mod:`.local_tier`); each node needs
            its own. ``None``: no local tier.
        local_every: local cadence of :meth:`maybe_save`; required with ``local_url``.
        local_keep: how many committed local checkpoints each node keeps.
        local_storage_options: fsspec options of ``local_url``.

    Construction is collective when ``torch.distributed`` is initialised, and
    checks that every rank can write the URL.

    Example::

        >>> # xdoctest: +SKIP("needs a process group")
        >>> manager = CheckpointManager("s3://bucket/run-1", keep=3)
        >>> state = {"model": model, "optim": optimizer, "averager": averager}
        >>> resumed = manager.load_latest(state)   # steps done, or None
        >>> start = 0 if resumed is None else resumed
        >>> for step in range(start, steps):
        ...     train_step()
        ...     if (step + 1) % 100 == 0:
        ...         manager.save(step + 1, state)  # label: optimizer steps done

    With a local tier, call :meth:`maybe_save` after every step instead; it
    saves to each tier whose cadence has come (cloud every 100 steps here,
    local every 5) and :meth:`load_latest` resumes from the newest step any
    tier can provide for every rank::

        >>> # xdoctest: +SKIP("needs a process group")
        >>> manager = CheckpointManager("s3://bucket/run-1", every=100, local_url="/dev/shm/run-1", local_every=5)
        >>> resumed = manager.load_latest(state)        # manager.last_source: "local", "buddy" or "cloud"
        >>> start = 0 if resumed is None else resumed
        >>> for step in range(start, steps):
        ...     train_step()
        ...     manager.maybe_save(step + 1, state, final=step + 1 == steps)
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
        retry_deadline_s: float = 120.0,
        include_rng: bool = True,
        timeout: timedelta = timedelta(minutes=10),
        every: int | None = None,
        local_url: str | None = None,
        local_every: int | None = None,
        local_keep: int = 2,
        local_storage_options: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} must be an int >= 1 (how many checkpoints to keep).")
        for name, value in (("every", every), ("local_every", local_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be None or an int >= 1 (save every that many steps).")
        if (local_url is None) != (local_every is None):
            raise ValueError(
                f"local_url={local_url!r} and local_every={local_every!r}: give both (a node-local folder and "
                "its cadence in steps) or neither."
            )
        self.every = every
        self.local_every = local_every
        self.url = url
        self.keep = keep
        self.async_save = async_save
        self.include_rng = include_rng
        policy = RetryPolicy(retries=retries, base_delay_s=retry_backoff_s, deadline_s=retry_deadline_s)
        self.storage = Storage(url, storage_options, policy=policy)
        if dist.is_available() and dist.is_initialized():
            # A group of its own: async saves run collectives from a background
            # thread, and gloo lets them coordinate on CPU even when training uses NCCL.
            self._group: dist.ProcessGroup | None = dist.new_group(backend="gloo", timeout=timeout)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self._group, self.rank, self.world_size = None, 0, 1
        self.last_loaded: CommitRecord | None = None
        # The step this run last loaded or saved: retention supersedes newer ones.
        self._previous: int | None = None
        self.last_source: str | None = None  # where load_latest found it: "local", "buddy" or "cloud"
        self._warned_no_averager = False
        self._closed = False
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
        self.local: LocalTier | None = None
        if local_url is not None:
            self.local = LocalTier(local_url, keep=local_keep, storage_options=local_storage_options, timeout=timeout)
        release_at_exit(self._release_group)  # after the wait below, which atexit runs first
        atexit.register(_wait_at_exit, weakref.ref(self))

    # -- collectives -------------------------------------------------------

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, over the checkpoint's own gloo group."""
        if self._group is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def _raise_if_any(self, errors: list[str | None], what: str) -> None:
        """Raise the same failure on every rank, its details printed once.

        Rank 0 raises the combined error (each distinct reason with the ranks
        that hit it); the others raise a short one pointing at rank 0, so a
        torchrun log holds one copy, not one per rank per rank.
        """
        combined = combine_errors(errors, what)
        if combined is None:
            return
        if self.rank == 0:
            raise CheckpointError(combined)
        failed = sum(1 for e in errors if e)
        raise CheckpointError(f"{what} failed on {failed} rank(s); rank 0 reports the reasons")

    def _on_rank0(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 and shared; its failure raises on every rank at once."""
        value, error = None, None
        if self.rank == 0:
            try:
                value = fn()
            except Exception as exc:  # noqa: BLE001 - every rank must reach the broadcast
                error = f"{type(exc).__name__}: {exc}"
        if self._group is not None:
            box = [(value, error)]
            dist.broadcast_object_list(box, src=0, group=self._group)
            value, error = box[0]
        if error:
            raise CheckpointError(f"{what} failed on rank 0: {error}")
        return value  # type: ignore[return-value]

    # -- saving ------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any], *, blocking: bool | None = None) -> None:
        """Save ``state`` as checkpoint ``step`` (optimizer steps done). Collective over the world.

        ``state`` maps names to objects with ``state_dict()``/``load_state_dict()``
        (modules, optimizers, the averager, schedulers) or to plain values.
        With ``blocking=False`` (or ``async_save=True``) the state is staged to
        host memory and written in the background; the next save, :meth:`wait`,
        :meth:`close` or interpreter exit waits for it and raises if it failed.
        """
        step_dir_name(step)  # validates step before anything is written
        self._check_open()
        self.wait()
        background = self.async_save if blocking is None else not blocking
        payload = capture(state, include_rng=self.include_rng, stage=False)
        entries = _small_summaries(payload, list(state))
        if background:
            payload = copy_to_cpu(payload, self._staging)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # the non_blocking copies must land before writing
        if not any(_is_averager(obj) for obj in state.values()):
            self._warn_if_averager_left_out(state)
        extra = {"entries": sorted(state)}
        if not background:
            self._write_and_commit(step, payload, entries, extra)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elastic-hsgd-ckpt")
        self._pending = (step, self._executor.submit(self._write_and_commit, step, payload, entries, extra))

    def maybe_save(self, step: int, state: Mapping[str, Any], *, final: bool = False) -> tuple[str, ...]:
        """Call after every step: save ``step`` to each tier whose cadence divides it. Collective.

        The cloud tier (:meth:`save`) every ``every`` steps, and at ``final``;
        the local tier every ``local_every`` steps, after the cloud save so it
        never delays a cloud commit. Blocking is the cloud save's (see
        ``async_save``) plus the local tier's staging copy. Returns the tiers
        saved, e.g. ``("cloud", "local")``.
        """
        saved: list[str] = []
        if final or (self.every is not None and step % self.every == 0):
            self.save(step, state)
            saved.append("cloud")
        if self.local_every is not None and step % self.local_every == 0:
            self.save_local(step, state)
            saved.append("local")
        return tuple(saved)

    def save_local(self, step: int, state: Mapping[str, Any]) -> None:
        """Save ``state`` to the local tier (and its buddy copy) as step ``step``. Collective.

        Blocks only while the state is copied into a host buffer; see :mod:`.local_tier`.
        """
        if self.local is None:
            raise ValueError("this CheckpointManager has no local tier: pass local_url= and local_every=.")
        payload = capture(state, include_rng=self.include_rng)
        self.local.save(step, payload, _small_summaries(payload, list(state)), {"entries": sorted(state)})

    @property
    def local_committed_step(self) -> int | None:
        """The newest local step this rank knows committed on every node (``None`` without a local tier)."""
        return None if self.local is None else self.local.committed_step
    def _warn_if_averager_left_out(self, state_names: Mapping[str, Any]) -> None:
        # The manager cannot know what the training loop uses; it can see an
        # averager alive in this process.
        if self._warned_no_averager or not _live_averager():
            return
        self._warned_no_averager = True
        warnings.warn(
            f"saving to {self.url} without the averager: a HierarchicalModelAverager exists in this process, but "
            f"`state` has none (it has {sorted(state_names)}), so a resume would restart its step at 0 and repeat "
            "warmup. Add it, e.g. state['averager'] = averager.",
            stacklevel=3,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"checkpoint manager for {self.url} is closed: create a new one to save or load.")

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
        """Wait for a pending save, stop the save thread and release the manager's
        gloo group. Idempotent; the manager cannot save or load afterwards.

        Called at interpreter exit too. Releasing the group matters there: a
        gloo worker thread drops its last reference to a finished collective's
        tensors a moment after the caller saw it complete, and that needs the
        GIL; if the interpreter is already finalizing, Python ends the thread
        inside a C++ destructor and the process aborts with "terminate called
        without an active exception". Destroying the group joins those threads
        (the GIL released) while the interpreter is still whole.
        """
        if self._closed:
            return
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self.local is not None:
                self.local.close()
            self._release_group()
            self._closed = True

    def _release_group(self) -> None:
        release_group(self._group)
        self._group = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _write_and_commit(self, step: int, payload: dict[str, Any], entries: dict[str, Any], extra: dict) -> None:
        started = time.perf_counter()
        step_dir = self.storage.path(step_dir_name(step))

        def clear() -> None:
            # A crashed earlier attempt at this step, or a step redone after a
            # fall-back: its old commit must not vouch for the new files.
            if self.storage.exists(step_dir):
                self.storage.rm_file(self.storage.commit_path(step))
                self.storage.remove_tree(step_dir)

        self._on_rank0(f"clearing {step_dir} for checkpoint of step {step}", clear)

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

        def commit() -> None:
            record = CommitRecord(
                step=step,
                world_size=self.world_size,
                files=tuple(FileEntry(*w) for w, _ in outcomes),
                unix_time=time.time(),
                entries=entries,
                extra=extra,
            )
            self.storage.write_atomic(self.storage.commit_path(step), json.dumps(record.to_json(), indent=1).encode())
            self._apply_retention(step)

        self._on_rank0(f"committing checkpoint of step {step}", commit)
        self._previous = step
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
        """Delete what :func:`~.layout.plan_retention` says (see the class docstring)."""
        try:
            plan = plan_retention(self.storage.committed_steps(), self.storage.step_dirs(), self.keep, just_committed, self._previous)
            drop_committed, drop_partial = plan
            for step in drop_committed + drop_partial:
                # The commit record goes first, so a half-deleted step is never "committed".
                if step in drop_committed:
                    self.storage.rm_file(self.storage.commit_path(step))
                self.storage.remove_tree(self.storage.path(step_dir_name(step)))
                logger.info("deleted %s checkpoint step %d", "partial" if step in drop_partial else "committed", step)
        except Exception as exc:  # noqa: BLE001 - retention must never fail a committed save
            logger.warning("could not apply retention (keep=%d) at %s: %r", self.keep, self.url, exc)

    # -- reading -----------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, oldest first (this rank's own listing; not collective)."""
        return self.storage.committed_steps()

    def commit_record(self, step: int) -> CommitRecord:
        """The parsed commit record of a committed step; ``_Unusable`` if it is missing or malformed."""
        try:
            raw = self.storage.read_file(self.storage.commit_path(step))
        except FileNotFoundError:
            raise _Unusable(f"no committed checkpoint of step {step} at {self.url}") from None
        try:
            return CommitRecord.from_json(json.loads(raw))
        except (ValueError, RecursionError) as exc:
            raise _Unusable(f"commit record of step {step} at {self.url} is unreadable: {exc}") from exc

    def _fetch(self, record: CommitRecord, saved_rank: int) -> dict[str, Any]:
        """Read, verify and decode one saved rank's file; ``_Unusable`` if it does not verify."""
        entry = record.file_for_rank(saved_rank)
        path = self.storage.path(step_dir_name(record.step), entry.name)
        try:
            size = self.storage.size(path)
        except FileNotFoundError:
            raise _Unusable(f"{entry.name} is missing") from None
        if size != entry.bytes:
            state = "truncated" if size < entry.bytes else "longer than recorded"
            raise _Unusable(f"{entry.name} is {state}: {size} bytes, commit record says {entry.bytes}")
        buffer, checksum = self.storage.read_into(path, entry.bytes)
        if checksum != entry.checksum:
            raise _Unusable(f"{entry.name} is corrupt: its checksum differs from the commit record")
        try:
            return deserialize(buffer)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a refusal
            raise _Unusable(f"{entry.name} was refused by the safe loader: {exc}") from exc

    def _agree(self, error: BaseException | None, what: str) -> None:
        """Collective: raise on every rank if any rank failed; ``_Unusable`` if all failures were verification."""
        report = None if error is None else (isinstance(error, _Unusable), f"{type(error).__name__}: {error}" if not isinstance(error, _Unusable) else str(error))
        reports = self.all_gather_object(report)
        failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
        if not failed:
            return
        # One copy in a torchrun log: rank 0 gives every reason, the others point to it.
        message = combine_errors([None if r is None else r[1] for r in reports], what) or ""
        if self.rank != 0:
            message = f"{what} failed on {len(failed)} rank(s); rank 0 reports the reasons"
        if all(unusable for _, (unusable, _) in failed):
            raise _Unusable(message)
        raise CheckpointError(message)

    def load(self, step: int, state: MutableMapping[str, Any], *, strict: bool = True) -> int:
        """Load checkpoint ``step`` into ``state``; return ``step``. Collective; raises if any rank cannot.

        With ``strict`` (the default), a checkpoint entry that ``state`` lacks
        is a ``KeyError`` naming it; ``strict=False`` loads only what ``state`` has.
        """
        self._check_open()
        self.wait()
        try:
            self._load_step(step, state, strict=strict)
        except _Unusable as exc:
            raise CheckpointError(str(exc)) from None
        return step

    def load_latest(self, state: MutableMapping[str, Any], *, strict: bool = True) -> int | None:
        """Load the newest checkpoint that every rank can get and verify; return its step, or ``None`` if there is none.

        The step is the label: the number of optimizer steps done when it was
        saved, i.e. the next step to run. ``strict`` as in :meth:`load`.

        Candidates are the cloud tier's committed steps and, with a local tier,
        the local steps some node holds; the newest wins. A local step is used
        when every rank's needs are covered by its node's copies or by copies
        on other nodes (sent over the tier's group); otherwise, or when copies
        fail verification, the same step comes from the cloud if it is there.
        A corrupt, truncated, missing or refused checkpoint is skipped with a
        warning, falling back to the one before. A storage error that outlasts
        the retry policy is raised on every rank instead (falling back would
        silently lose the newer work). Ranks agree on the step;
        :attr:`last_source` says where it came from.
        """
        self._check_open()
        self.wait()
        candidates = self._on_rank0(f"listing checkpoints at {self.url}", self.storage.committed_steps)
        survey = self.local.survey() if self.local is not None else []
        local_steps = {step for holding in survey for step in holding}
        loaded = None
        for step in sorted(set(candidates) | local_steps, reverse=True):
            if step in local_steps and self._load_local(step, survey, state, strict):
                loaded = step
                break
            if step not in candidates:
                continue
            if step in local_steps and self.rank == 0:
                logger.warning("step %d: local tier unusable, loading it from the cloud tier at %s", step, self.url)
            try:
                self._load_step(step, state, strict=strict)
                loaded = step
                break
            except _Unusable as exc:
                if self.rank == 0:  # one copy in a torchrun log
                    logger.warning("checkpoint step %d at %s is unusable, falling back to an older one: %s", step, self.url, exc)
        if self.local is not None:
            self.local.drop_newer_than(loaded)
        return loaded

    def _load_local(self, step: int, survey: list, state: MutableMapping[str, Any], strict: bool = True) -> bool:
        """Load ``step`` from the local tier if it covers every rank. Collective."""
        assert self.local is not None

        def needed(rank: int, saved_world: int, world: int) -> list[int]:
            return saved_ranks_to_read(rank, world, saved_world) or [structure_rank(rank, world, saved_world)]

        found = self.local.load(step, survey, needed)
        if found is None:
            return False
        plan, files = found

        def fetch(saved_rank: int) -> dict[str, Any]:
            try:
                return deserialize(files[saved_rank])
            except Exception as exc:  # noqa: BLE001 - any decoding failure is a refusal
                raise _Unusable(f"local copy of saved rank {saved_rank} was refused by the safe loader: {exc}") from exc

        try:
            self._load_step(step, state, record=plan.record, fetch=fetch, source=plan.source, strict=strict)
        except _Unusable as exc:
            logger.warning("local checkpoint step %d unusable: %s", step, exc)
            return False
        return True

    def _load_step(
        self,
        step: int,
        state: MutableMapping[str, Any],
        *,
        record: CommitRecord | None = None,
        fetch: Callable[[int], dict[str, Any]] | None = None,
        source: str = "cloud",
        strict: bool = True,
    ) -> None:
        """Load ``step``: from the cloud tier, or from ``record`` with ``fetch(saved_rank)`` (the local tier)."""
        where = self.url if source == "cloud" else self.local.url if self.local is not None else "?"
        what = f"loading checkpoint step {step} from {where}"
        if record is None:
            error = None
            try:
                record = self.commit_record(step)
            except Exception as exc:  # noqa: BLE001 - agreed below
                error = exc
            self._agree(error, what)
        assert record is not None
        fetch_file = fetch or (lambda saved_rank: self._fetch(record, saved_rank))
        if record.world_size == self.world_size:
            payload, error = None, None
            try:
                payload = fetch_file(self.rank)
            except Exception as exc:  # noqa: BLE001 - agreed below
                error = exc
            self._agree(error, what)
            restore(state, payload, restore_rng=True, strict=strict)
        else:
            restore(state, self._mean_of_replicas(record, what, fetch_file), restore_rng=False, strict=strict)
        self.last_loaded = record
        self.last_source = source
        self._previous = step
        if self.rank == 0:
            logger.info(
                "loaded checkpoint step %d (source: %s) from %s (world size %d -> %d%s)",
                record.step,
                source,
                where,
                record.world_size,
                self.world_size,
                "" if record.world_size == self.world_size else "; every rank got the mean of the saved replicas, RNG not restored",
            )

    def _mean_of_replicas(self, record: CommitRecord, what: str, fetch: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Collective: the mean of every saved replica's floating state, identical on every rank.

        Each rank reads its share of the saved files, sums their floating
        tensors in float64, and one all_reduce adds the shares up.
        """
        share = saved_ranks_to_read(self.rank, self.world_size, record.world_size)
        first: replicas.Split | None = None
        fingerprints: dict[int, str] = {}
        entries: dict[int, dict[str, str]] = {}
        error = None
        total = None
        try:
            for saved_rank in share or [structure_rank(self.rank, self.world_size, record.world_size)]:
                payload = fetch(saved_rank)
                payload.pop(RNG_KEY, None)
                part = replicas.split(payload)
                del payload
                if first is None:
                    first, total = part, part.accumulator()
                fingerprints[saved_rank], entries[saved_rank] = part.fingerprint, part.entries
                if share:
                    part.add_to(total)
                part.floats.clear()  # frees this file's buffer before the next is read
        except Exception as exc:  # noqa: BLE001 - agreed below
            error = exc
        self._agree(error, what)
        assert first is not None and total is not None
        gathered: dict[int, str] = {}
        for prints in self.all_gather_object(fingerprints):
            gathered.update(prints)
        differing = sorted(r for r, f in gathered.items() if f != gathered[0])
        if differing:
            everyone: dict[int, dict[str, str]] = {}
            for part_entries in self.all_gather_object(entries):
                everyone.update(part_entries)
            detail = replicas.first_difference(everyone[0], everyone[differing[0]])
            raise CheckpointError(
                f"{what}: cannot average the saved replicas, their non-floating state differs "
                f"(saved ranks {differing[:8]} differ from saved rank 0; first difference {detail}). "
                "Integer state, such as step counters, must be equal on every rank; "
                "resume at the saved world size instead."
            )
        if self._group is not None:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self._group)
        total /= record.world_size
        return first.fill(total)

class _Unusable(CheckpointError):
    """A checkpoint that does not verify (missing, truncated, corrupt, refused): fall back past it."""


def _small_summaries(payload: Mapping[str, Any], names: list[str], limit: int = 16384) -> dict[str, Any]:
    """Entries whose summary is small, for ``inspect`` (e.g. the averager's step and hierarchy)."""
    out = {}
    for name in names:
        summary = summarize(payload[name])
        if len(json.dumps(summary)) <= limit:
            out[name] = summary
    return out


def _is_averager(obj: Any) -> bool:
    from ..averager import HierarchicalModelAverager  # lazily: checkpoint/ does not depend on the averager

    return isinstance(obj, HierarchicalModelAverager)


def _live_averager() -> bool:
    from ..averager import HierarchicalModelAverager

    return bool(HierarchicalModelAverager.instances())


def combine_errors(errors: list[str | None], what: str) -> str | None:
    """One message for every rank's outcome, ``None`` if all succeeded; each
    distinct reason once, with the ranks that hit it."""
    by_reason: dict[str, list[int]] = {}
    for rank, error in enumerate(errors):
        if error:
            by_reason.setdefault(error, []).append(rank)
    if not by_reason:
        return None
    failed = sum(len(ranks) for ranks in by_reason.values())
    parts = [f"{_ranks(ranks)}: {reason}" for reason, ranks in list(by_reason.items())[:4]]
    more = f"; and {len(by_reason) - 4} more reasons" if len(by_reason) > 4 else ""
    return f"{what} failed on {failed} of {len(errors)} rank(s): " + "; ".join(parts) + more


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def _wait_at_exit(ref: "weakref.ref[CheckpointManager]") -> None:
    manager = ref()
    if manager is None:
        return
    try:
        manager.close()
    except Exception:  # noqa: BLE001 - nothing left to raise to at exit
        logger.exception("a pending checkpoint save failed at exit")
