"""CheckpointManager: collective, atomic, verified checkpoints to any fsspec URL, in tiers.

The manager orchestrates; the tiers (:mod:`.tiers`) do the I/O. A save
captures the state once and hands it to a tier; a load asks every tier which
steps it holds, tries the newest step from the nearest tier that has it, and
restores what that tier reads (the mean of the saved replicas when the world
size changed). Every rank agrees on every outcome.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, MutableMapping
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..collectives import Peers
from ..collectives import combine_errors as combine_errors  # re-exported: its earlier home
from ..process_groups import release_at_exit
from ..registry import is_step_keeper, step_keepers
from .background import close_at_exit
from .commit import Unusable
from .layout import CommitRecord, small_summaries, step_dir_name
from .merge import check_merge, policies
from .dtensor_state import holds_dtensors
from .replicas import mean_of_replicas
from .sharded_load import load_sharded_step
from .state import capture, restore
from .storage import CheckpointError, RetryPolicy, Storage
from .tiers import StepReader, Tier
from .tiers.cloud import CloudTier
from .tiers.local import LocalTier

logger = logging.getLogger(__name__)


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
    are kept; the save itself is never deleted. A load abandons the committed
    steps newer than the step loaded at that moment (a fall-back past a
    corrupt newest step, or :meth:`load` of an older step): they are hidden
    from readers at once and deleted at the next save, so a restart resumes
    from the run's own timeline. Steps another writer commits later (torchft)
    are ordinary steps. A run that has not loaded refuses to save where
    committed steps exist (``overwrite=True`` replaces them), and a re-saved
    step stays committed until its new version is.

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
            ``emptyDir``) for the local tier (:mod:`.tiers.local`); each node needs
            its own. ``None``: no local tier.
        local_every: local cadence of :meth:`maybe_save`; required with ``local_url``.
        local_keep: how many committed local checkpoints each node keeps.
        local_storage_options: fsspec options of ``local_url``.
        local_size_limit: the most bytes a node's local folder may hold (e.g. its
            ``emptyDir`` ``sizeLimit``); a local save that would go over it, or
            over the folder's free space, is skipped with a WARNING.
        merge: how an entry's saved replicas combine when the world size
            changed, by entry name: ``"equal"``, ``"rank0"``, ``"min"``, ``"max"``
            or ``"mean"`` (:mod:`.merge`; e.g. ``{"scaler": "min"}``). Default:
            ``"equal"`` (floats averaged, the rest equal), except GradScaler and
            ReduceLROnPlateau entries (:func:`~.merge.default_policy`).
        overwrite: let a run that has not loaded save over the location's
            committed steps (those newer than its first save are deleted).
        node: this process's node for the local tier's buddy placement; default
            ``ELASTIC_HSGD_NODE_RANK``, else torchrun's ``GROUP_RANK``.

    Construction is collective when ``torch.distributed`` is initialised, and
    checks that every rank can write the URL. The tiers are the attributes
    ``cloud`` (:class:`~.tiers.cloud.CloudTier`) and ``local``
    (:class:`~.tiers.local.LocalTier` or ``None``), both in ``tiers``.

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
        local_size_limit: int | None = None,
        merge: Mapping[str, str] | None = None,
        overwrite: bool = False,
        node: int | None = None,
    ) -> None:
        _check_process_group()
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
        self.merge = check_merge(merge)
        policy = RetryPolicy(retries=retries, base_delay_s=retry_backoff_s, deadline_s=retry_deadline_s)
        self.storage = Storage(url, storage_options, policy=policy)
        # A group of its own: async saves run collectives from a background
        # thread, and gloo lets them coordinate on CPU even when training uses NCCL.
        self._peers = Peers.own_gloo_group(timeout, CheckpointError)
        self.rank, self.world_size = self._peers.rank, self._peers.world_size
        self.last_loaded: CommitRecord | None = None
        self.last_source: str | None = None  # where load_latest found it: "local", "buddy" or "cloud"
        self._warned_no_averager = False
        self._closed = False
        # Checks that every rank can write; keeps the run id the local tier's steps carry.
        self.cloud = CloudTier(self.storage, self._peers, keep=keep, overwrite=overwrite, run_identity=local_url is not None)
        self.local: LocalTier | None = None
        if local_url is not None:
            self.local = LocalTier(
                local_url, keep=local_keep, storage_options=local_storage_options, timeout=timeout, node=node, run=self.cloud.run_stamp,
                size_limit=local_size_limit,
            )
        # In saving order; loads ask the nearest (the last) first.
        self.tiers: tuple[Tier, ...] = (self.cloud,) if self.local is None else (self.cloud, self.local)
        release_at_exit(self._release_group)  # after the wait below, which atexit runs first
        close_at_exit(self)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, over the checkpoint's own gloo group."""
        return self._peers.gather(obj)

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
        _check_label(step, state)
        self._check_open()
        self.wait()
        background = self.async_save if blocking is None else not blocking
        payload = capture(state, include_rng=self.include_rng, stage=False)
        entries = small_summaries(payload, list(state))
        if not any(is_step_keeper(obj) for obj in state.values()):
            self._warn_if_averager_left_out(state)
        self.cloud.save(step, payload, entries, {"entries": sorted(state)}, background=background)

    def maybe_save(self, step: int, state: Mapping[str, Any], *, final: bool = False) -> tuple[str, ...]:
        """Call after every step: save ``step`` to each tier whose cadence divides it. Collective.

        The cloud tier (:meth:`save`) every ``every`` steps, and at ``final``;
        the local tier every ``local_every`` steps, after the cloud save so it
        never delays a cloud commit. Blocking is the cloud save's (see
        ``async_save``) plus the local tier's staging copy; a local save due
        while the previous one still runs is skipped by every rank, never
        waited for. Returns the tiers saved, e.g. ``("cloud", "local")``
        ("local": staged, committed in the background unless a rank skipped it).
        """
        _check_label(step, state)
        saved: list[str] = []
        if self.local is not None:
            self.local.poll()  # a lost peer stops the worker at the first step after it is known
        if final or (self.every is not None and step % self.every == 0):
            self.save(step, state)
            saved.append("cloud")
        if self.local_every is not None and step % self.local_every == 0 and self._save_local(step, state, skip_if_busy=True):
            saved.append("local")
        return tuple(saved)

    def save_local(self, step: int, state: Mapping[str, Any]) -> None:
        """Save ``state`` to the local tier (and its buddy copy) as step ``step``. Collective.

        Waits for the previous local save, then blocks only while the state is
        copied into a host buffer; see :mod:`.tiers.local`.
        """
        self._save_local(step, state, skip_if_busy=False)

    def _save_local(self, step: int, state: Mapping[str, Any], *, skip_if_busy: bool) -> bool:
        if self.local is None:
            raise ValueError("this CheckpointManager has no local tier: pass local_url= and local_every=.")
        if skip_if_busy and not self.local.due(step, self.local_every):  # the tier's CPU budget: nothing captured
            return False
        payload = capture(state, include_rng=self.include_rng)
        return self.local.save(step, payload, small_summaries(payload, list(state)), {"entries": sorted(state)}, skip_if_busy=skip_if_busy)

    @property
    def local_committed_step(self) -> int | None:
        """The newest local step this rank knows committed on every node (``None`` without a local tier)."""
        return None if self.local is None else self.local.committed_step

    def _warn_if_averager_left_out(self, state_names: Mapping[str, Any]) -> None:
        # The manager cannot know what the training loop uses; it can see an
        # averager alive in this process.
        if self._warned_no_averager or not step_keepers():
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
        self.cloud.wait()

    def close(self) -> None:
        """Wait for a pending save, stop the save threads and release the manager's
        gloo group (and the local tier's). Idempotent; the manager cannot save or load afterwards.

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
            with ExitStack() as closing:  # every tier is closed, also after one raised
                for tier in reversed(self.tiers):
                    closing.callback(tier.close)  # run in saving order: the cloud tier's wait first
        finally:
            self._release_group()
            self._closed = True

    def _release_group(self) -> None:
        self._peers.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- reading -----------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps of the cloud tier, oldest first (this rank's own listing; not collective)."""
        return self.cloud.steps()

    def commit_record(self, step: int) -> CommitRecord:
        """The parsed commit record of a committed cloud step; a :class:`CheckpointError` if it is missing or malformed."""
        return self.cloud.commit_record(step)

    def load(self, step: int, state: MutableMapping[str, Any], *, strict: bool = True) -> int:
        """Load checkpoint ``step`` into ``state``; return ``step``. Collective; raises if any rank cannot.

        With ``strict`` (the default), a checkpoint entry that ``state`` lacks
        is a ``KeyError`` naming it; ``strict=False`` loads only what ``state`` has.
        """
        self._check_open()
        self.wait()
        self.cloud.held_steps()  # what is newer than ``step`` now: the steps this load abandons
        try:
            self._restore(step, state, self.cloud.reader(step), strict)
        except Unusable as exc:
            raise CheckpointError(str(exc)) from None
        return step

    def continue_from(self, step: int) -> None:
        """Say that ``state`` continues step ``step`` of this location's run, obtained without
        loading (a torchft heal from a live peer), so saves may follow; nothing is abandoned. Call it on every rank."""
        step_dir_name(step)
        self.wait()
        self.cloud.continue_from(step)

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
        held = [(tier, tier.held_steps()) for tier in self.tiers]
        nearest_first = held[::-1]
        loaded = None
        for step in sorted(set().union(*(steps for _, steps in held)), reverse=True):
            if self._load_from_any([tier for tier, steps in nearest_first if step in steps], step, state, strict):
                loaded = step
                break
        for tier in self.tiers:
            tier.resumed(loaded)
        return loaded

    def _load_from_any(self, tiers: list[Tier], step: int, state: MutableMapping[str, Any], strict: bool) -> bool:
        """Load ``step`` from the first of ``tiers`` that gives every rank its part. Collective."""
        for index, tier in enumerate(tiers):
            if index and self.rank == 0:
                logger.warning("step %d: %s tier unusable, loading it from the %s tier at %s", step, tiers[index - 1].name, tier.name, tier.url)
            try:
                reader = tier.reader(step)
                if reader is not None:
                    self._restore(step, state, reader, strict)
                    return True
            except Unusable as exc:
                tier.warn_unusable(step, exc)
        return False

    def _restore(self, step: int, state: MutableMapping[str, Any], reader: StepReader, strict: bool) -> None:
        """Load what ``reader`` offers of ``step`` into ``state``: this rank's own file, or the mean of the replicas."""
        what = f"loading checkpoint step {step} from {reader.url}"
        record = reader.record
        exact = record.world_size == self.world_size
        if holds_dtensors(state):  # DTensor state: exact, or each new box from the saved replicas (.sharded_load)
            exact = load_sharded_step(state, reader, self._peers, storage=self.storage, strict=strict, policies=policies(state, self.merge)).exact
        elif exact:
            payload, error = None, None
            try:
                payload = reader.fetch(self.rank)
            except Exception as exc:  # noqa: BLE001 - agreed below
                error = exc
            self._peers.agree(error, what, soft=Unusable)
            restore(state, payload, restore_rng=True, strict=strict)
        else:
            merged = mean_of_replicas(record, what, reader.fetch, self._peers, policies(state, self.merge))
            restore(state, merged, restore_rng=False, strict=strict, views=False)
        self.last_loaded = record
        self.last_source = reader.source
        for tier in self.tiers:
            tier.loaded(step)
        if self.rank == 0:
            logger.info(
                "loaded checkpoint step %d (source: %s) from %s (world size %d -> %d%s)",
                record.step,
                reader.source,
                reader.url,
                record.world_size,
                self.world_size,
                "" if exact else "; every rank got the mean of the saved replicas, RNG not restored",
            )


def _check_process_group() -> None:
    """A manager without a process group is a world of one: refuse that while the launcher says otherwise."""
    world = os.environ.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 1 and not (dist.is_available() and dist.is_initialized()):
        raise CheckpointError(
            f"CheckpointManager built before torch.distributed.init_process_group, while WORLD_SIZE={world}: every "
            f"process would act as rank 0 of a world of 1 and overwrite the others' files. Call "
            "torch.distributed.init_process_group (or elastic_hsgd.elastic.init_distributed) first."
        )


def _check_label(step: int, state: Mapping[str, Any]) -> None:
    """A checkpoint's label is the averager's step: refuse any other, which would fail the resume later.

    An averager that has not averaged yet (step 0) takes any label: nothing
    it holds depends on the step, and the loop's off-by-one cannot produce it.
    """
    for name, obj in state.items():
        if is_step_keeper(obj) and getattr(obj, "step", 0) not in (0, step):
            raise ValueError(
                f"checkpoint label {step} differs from state[{name!r}].step = {obj.step}, the averager's step. The "
                "label is the number of optimizer steps done, which is averager.step: save after "
                "average_parameters with step + 1 (`for step in range(start, steps): ...; manager.save(step + 1, state)`)."
            )
