"""A node-local checkpoint tier with a copy of every rank's state on another node.

Host memory (``/dev/shm``, a Kubernetes ``emptyDir`` with ``medium: Memory``)
survives a worker restart, and a copy on another node survives losing a node,
so this tier can be written every few steps where the cloud tier cannot. Each
node has its own folder (``local_url``); nodes never share it::

    <local_url>/step_000000000105/rank_00001.safetensors          rank 1's own state (rank 1 lives here)
    <local_url>/step_000000000105/buddy/rank_00003.safetensors    a copy of rank 3's state, held for it
    <local_url>/step_000000000105/COMMIT.json               written last, by the node's lowest rank

The bytes, checksums and commit record are the cloud tier's
(:func:`~..state.serialize`, :class:`~..layout.CommitRecord`): a node writes its
commit record only after every rank of the world reported its own file and
its buddy's copy written with matching checksums, so a local step exists only
once it is complete everywhere.

Saving blocks only for the staging copy (the encoded state into a reused host
buffer); writing, the transfer to the buddy (gloo send/recv on the tier's own
group) and the commit run in a background thread. Training never waits for
a save: one due (``maybe_save``) while the previous one is still being
written is skipped by every rank, and so is a save that would not fit a
node's folder (its free space, ``size_limit``); :mod:`.local_gate` agrees on
both in the save thread, in one all_gather that also sets the next due step
from the saves' CPU budget (:mod:`.local_cadence`: steps below it are
skipped before anything is captured). Only a rank a full ``local_every`` steps ahead of the
slowest (its previous save still waits for that rank to reach it) waits for
it, as it would at the next averaging step: skew never skips saves. Skips are
counted (:attr:`LocalTier.skipped`) and logged (:mod:`.local_skips`).

Two kinds of failed save. A storage failure (a write, a checksum) is agreed by
every rank over the tier's group, which stays usable: it is logged and training
goes on (the cloud tier is unaffected). A failed collective (a peer died or
timed out) leaves the group unusable and the world short of a member: the next
save (or :meth:`LocalTier.poll`, every ``maybe_save``), :meth:`LocalTier.wait`
or load raises :class:`PeerLost`, so the worker
exits and torchelastic restarts the world, which resumes from the newest step
committed everywhere (the interrupted one never is).

Loading is planned from what every rank reports (:func:`~..local_plan.plan_load`,
pure): the newest step for which each rank the new world needs can be read from
its own node's folder (``"local"``) or from a copy held elsewhere, sent over the
tier's group (``"buddy"``). A copy that fails its checksum is excluded with a
warning and the plan is made again.

Example::

    >>> # xdoctest: +SKIP("needs a process group")
    >>> manager = CheckpointManager("s3://bucket/run", every=100, local_url="/dev/shm/ckpt", local_every=5)
    >>> for step in range(start, steps):
    ...     train_step()
    ...     manager.maybe_save(step + 1, state)   # local every 5 steps, cloud every 100
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ...collectives import Peers
from ...process_groups import release_at_exit
from ..background import BackgroundSaver
from ..commit import decode, remove_step
from ..layout import files_to_read, step_dir_name
from ..local_plan import BUDDY, CopyKey, LoadPlan, NeededFn, StepHolding, buddy_ranks, plan_load
from ..run_identity import RunStamp, foreign_reason
from ..state import serialize
from ..storage import CheckpointError, Storage
from . import StepReader
from .local_cadence import Cadence, cpu_outside, training_clock
from .local_commit import write_copy_commit
from .local_gate import decode_reports, encode_report, free_bytes, held_bytes, verdict
from .local_load import BUDDY_DIR, execute_plan, node_holdings
from .local_skips import SkipLog
from .local_node import NODE_ENV, collective_timeout, node_from_env, node_in_env, warn_node_unknown

__all__ = ["BUDDY_DIR", "NODE_ENV", "LocalTier", "PeerLost", "node_from_env"]

logger = logging.getLogger(__name__)


class PeerLost(CheckpointError):
    """A collective of the local tier failed: a peer died or timed out, and the
    tier's group is unusable. Let it end the worker, so torchelastic restarts the world."""


def _needed(rank: int, saved_world: int, world: int) -> list[int]:
    """A :data:`~..local_plan.NeededFn`: the saved files ``rank`` of the new world reads."""
    return files_to_read(rank, world, saved_world)


class LocalTier:
    """Node-local checkpoints of every rank, plus a buddy copy on another node.

    Construction is collective when ``torch.distributed`` is initialised (it
    creates the tier's own gloo group and learns every rank's node). The
    :class:`~..manager.CheckpointManager` drives it; see its ``local_url``.

    ``run`` gives this run's :class:`~..run_identity.RunStamp` (collective the
    first time): every commit record carries it, and a step stamped by
    another run is never loaded (a WARNING names the folder and the step).
    """

    name = "local"

    def __init__(
        self,
        url: str,
        *,
        keep: int = 2,
        storage_options: dict[str, Any] | None = None,
        timeout: timedelta = timedelta(minutes=10),
        node: int | None = None,
        run: Callable[[], RunStamp] | None = None,
        size_limit: int | None = None,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"local_keep={keep!r} must be an int >= 1 (how many local checkpoints to keep).")
        if size_limit is not None and (isinstance(size_limit, bool) or not isinstance(size_limit, int) or size_limit < 1):
            raise ValueError(f"local_size_limit={size_limit!r} must be None or an int >= 1: the most bytes a node's local folder may hold.")
        self.size_limit = size_limit
        self.url = url
        self.keep = keep
        self.storage = Storage(url, storage_options)
        known = node is not None or node_in_env() is not None
        node = node_from_env() if node is None else node
        if isinstance(node, bool) or not isinstance(node, int) or node < 0:
            raise ValueError(f"node={node!r} must be a non-negative int: the index of this process's node.")
        self._run = run
        self._lost: PeerLost | None = None  # set once a collective failed: the group is unusable from then on
        # Its own group: saves run collectives and send/recv from a background
        # thread, which must never interleave with the cloud tier's or training's.
        # The job's collective timeout where shorter: a save's collective with a lost peer fails as soon as training's.
        self.timeout = collective_timeout(timeout)
        self._peers = Peers.own_gloo_group(self.timeout, CheckpointError)
        self.rank, self.world_size = self._peers.rank, self._peers.world_size
        gathered = self._all_gather((node, self.storage.writable_error(), known))
        failed = [(r, e) for r, (_, e, _) in enumerate(gathered) if e]
        if failed:
            raise CheckpointError(f"local checkpoint tier unusable on {len(failed)} rank(s): " + "; ".join(f"rank {r}: {e}" for r, e in failed[:4]))
        self.nodes = [n for n, _, _ in gathered]
        unknown = [r for r, (_, _, k) in enumerate(gathered) if not k]
        if unknown and self.world_size > 1 and self.rank == 0:
            warn_node_unknown(unknown)
        self.node = node
        self.buddies = buddy_ranks(self.nodes)
        self.committed_step: int | None = None  # newest step this process saw committed everywhere
        self._saver = BackgroundSaver("elastic-hsgd-local-ckpt")
        self._blob = bytearray()  # the staging buffer, reused while the state's size is unchanged
        self._staged = False  # a queued or running save holds _blob
        self._agreed = threading.Event()  # set once every rank reached the staged save (its verdict is in)
        self._broken: BaseException | None = None  # a save thread's collective that failed: later saves skip the group
        self._skips = SkipLog(self.rank, url)  # due saves, and the skips by kind ("cadence", "busy", "space")
        self._cadence = Cadence(every=1)  # the CPU budget (.local_cadence); its every is set by the first due()
        self._next_due = 0  # the save thread's cadence.next_due, for the foreground: steps below it are skipped
        self._cpu_lock = threading.Lock()
        self._cpu_spent = 0.0  # CPU seconds of saves (staging and save thread) since the last gather
        self._last_gather: float | None = None  # monotonic time of the save thread's last gather
        self._last_due: tuple[int, float] | None = None  # (step, monotonic time) of the last save asked for
        self._training_clock: int | None = None  # the CPU clock of the thread that saves (trains)
        self._survey: list[dict[int, StepHolding]] = []  # every rank's holdings, as of the last held_steps()
        self._closed = False
        # Its gloo group must be gone before the interpreter finalizes, manager or not
        # (see elastic_hsgd/process_groups.py); close() is idempotent.
        release_at_exit(self.close)

    @property
    def _group(self) -> Any:
        """The tier's own gloo group; ``None`` once closed."""
        return self._peers.group

    @property
    def _executor(self) -> Any:
        """The save thread's executor; ``None`` before the first save and once closed."""
        return self._saver.executor

    def _all_gather(self, obj: Any) -> list[Any]:
        self._raise_if_lost()
        if self._group is None and self.world_size > 1:
            raise CheckpointError(f"the local checkpoint tier at {self.url} is closed: it cannot save or load any more.")
        return self._peers.gather(obj)

    @property
    def node_lead(self) -> bool:
        """The lowest rank of this node writes its folder's commit records and prunes it."""
        return self.nodes.index(self.node) == self.rank

    # -- saving ----------------------------------------------------------------

    @property
    def skipped(self) -> int:
        """How many saves every rank skipped (the previous save still running, or no space)."""
        return self._skips.total

    def due(self, step: int, every: int) -> bool:
        """Whether ``maybe_save`` should capture and :meth:`save` ``step`` (a multiple of ``every``).

        ``False`` for a step the CPU budget (:mod:`.local_cadence`) ruled out at
        an earlier save: it is counted as skipped, nothing is captured, and
        every rank skips it (a rank that does not know yet drops it in its save
        thread, with no collective).
        """
        self._cadence.every = every
        if step >= self._next_due:
            return True
        self._skips.asked()
        self._skips.skip(step, "cadence", "the local saves' CPU budget is spent (see elastic_hsgd.checkpoint.tiers.local_cadence)")
        return False

    def save(self, step: int, payload: dict[str, Any], entries: dict | None, extra: dict | None, *, skip_if_busy: bool = False) -> bool:
        """Stage ``payload`` (the only blocking part) and write, copy and commit it in the background.

        ``payload`` may reference live tensors: it is encoded into the staging
        buffer before this returns. With ``skip_if_busy`` (``maybe_save``) a
        save due while this rank's previous one still runs is not staged and
        returns ``False``: it is queued empty, and every rank skips it (see
        :mod:`.local_gate`). Without it, waits for the previous saves first.
        Either way, whether the step commits is agreed in the save thread.
        """
        step_dir_name(step)
        if self._closed:
            raise CheckpointError(f"the local checkpoint tier at {self.url} is closed: it cannot save any more.")
        started = time.thread_time()
        if self._training_clock is None:
            self._training_clock = training_clock()
        if skip_if_busy:
            self.poll()
            if self._staged and not self._agreed.is_set():
                # The staged save still waits for a rank a full local_every steps behind: wait for
                # it (as the next averaging step would), so skew between ranks never skips saves.
                self.wait()
        else:
            self.wait()
        self._raise_if_lost()
        if self._run is not None:  # foreground: the stamp may need a collective of the cloud tier
            extra = {**(extra or {}), "run": self._run().to_json()}
        self._skips.asked()
        now = time.monotonic()
        step_s = None if self._last_due is None or step <= self._last_due[0] else (now - self._last_due[1]) / (step - self._last_due[0])
        self._last_due = (step, now)
        if self._staged:
            logger.debug("local checkpoint of step %d not staged on rank %d: the previous local save is still running", step, self.rank)
            self._saver.submit(step, self._agree_and_save, step, None, entries, extra, step_s, not skip_if_busy, queue=True)
            return False
        chunks = [memoryview(c).cast("B") for c in serialize(payload)]
        size = sum(c.nbytes for c in chunks)
        if len(self._blob) != size:
            self._blob = bytearray(size)
        view, offset = memoryview(self._blob), 0
        for chunk in chunks:
            view[offset : offset + chunk.nbytes] = chunk
            offset += chunk.nbytes
        del chunks, view
        self._staged = True
        self._agreed.clear()
        self._spent(time.thread_time() - started)
        self._saver.submit(step, self._agree_and_save, step, self._blob, entries, extra, step_s, not skip_if_busy, queue=True)
        return True

    def poll(self) -> None:
        """Without blocking: log the saves that failed on storage since the last call, and raise
        :class:`PeerLost` if one's collective failed (a peer is gone)."""
        self._saver.poll(self._save_failed)

    def _spent(self, cpu_s: float) -> None:
        with self._cpu_lock:
            self._cpu_spent += cpu_s

    def _agree_and_save(
        self, step: int, blob: bytearray | None, entries: dict | None, extra: dict | None, step_s: float | None = None, forced: bool = False
    ) -> None:
        """The save thread's part: agree with every rank whether ``step`` goes ahead, then write it.

        ``forced`` (an explicit ``save_local`` on every rank) ignores the CPU budget."""
        started = cpu_outside(self._training_clock)
        try:
            if self._broken is not None:
                raise RuntimeError(f"not attempted: an earlier save's collective failed ({self._broken!r})")
            if step < self._cadence.next_due and not forced:  # ruled out at an earlier gather: every rank drops it, no collective
                self._skips.skip(step, "cadence", "the local saves' CPU budget is spent")
                return
            found = self._gather_verdict(step, blob, step_s)
            if blob is not None:
                self._agreed.set()
            if found is None:
                write_copy_commit(self, step, blob, entries, extra)
            elif found[0] == "mismatch":
                raise CheckpointError(f"local checkpoint of step {step} not saved: {found[1]}")
            else:
                self._skips.skip(step, *found)
        except Exception as exc:
            if not isinstance(exc, CheckpointError):
                self._broken = self._broken or exc
            raise
        finally:
            self._spent(cpu_outside(self._training_clock) - started)
            if blob is not None:
                self._staged = False
                self._agreed.set()

    def _gather_verdict(self, step: int, blob: bytearray | None, step_s: float | None) -> tuple[str, str] | None:
        """Every rank's report on ``step`` in one all_gather: the verdict (:mod:`.local_gate`), and the next due step (:mod:`.local_cadence`)."""
        lead = self.node_lead
        space = (free_bytes(self.storage), held_bytes(self.storage) if self.size_limit is not None else None) if lead else (None, None)
        now = time.monotonic()
        with self._cpu_lock:
            cpu_s, self._cpu_spent = self._cpu_spent, 0.0
        wall_s = 0.0 if self._last_gather is None else now - self._last_gather
        self._last_gather = now
        mine = encode_report((step, None if blob is None else len(blob), *space), cpu_s, wall_s, step_s)
        self._raise_if_lost()
        if self._group is None and self.world_size > 1:
            raise CheckpointError(f"the local checkpoint tier at {self.url} is closed: it cannot save or load any more.")
        if self._group is None:
            gathered = [mine]
        else:
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(gathered, mine, group=self._group)
        reports, cpu, wall, rate = decode_reports(gathered)
        # rank 0's clock and step time, the most CPU any rank spent: the same due step everywhere
        self._next_due = self._cadence.update(step, wall_s=wall, cpu_s=cpu, step_s=rate)
        return verdict(reports, self.nodes, self.buddies, self.size_limit)

    def wait(self) -> None:
        """Block until the pending local saves finished.

        A save every rank agreed failed (storage) is logged, not raised: the
        local tier only shortens recovery, and the cloud tier is unaffected. A
        save whose collective failed raises :class:`PeerLost`: a peer is gone
        (or hung) and training on would only run further from the last
        committed step, unprotected; exiting lets torchelastic re-form the world.
        """
        self._saver.wait(self._save_failed)

    def _save_failed(self, step: int, exc: Exception) -> None:
        if isinstance(exc, PeerLost):  # queued behind the save whose collective failed
            raise exc
        if isinstance(exc, CheckpointError):
            logger.warning("local checkpoint of step %d at %s failed (the cloud tier is unaffected): %s", step, self.url, exc)
            return
        # Anything else is a collective of the tier's group that failed.
        self._lost = PeerLost(
            f"local checkpoint of step {step} at {self.url} not committed: a collective of the local tier failed "
            f"({type(exc).__name__}: {exc}). A peer died or timed out, so this worker stops for torchelastic to "
            f"restart the world (the newest local step committed everywhere is {self.committed_step})."
        )
        raise self._lost from exc

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise PeerLost(str(self._lost))

    def close(self) -> None:
        """Wait for the pending save, stop the save thread and release the tier's
        gloo group (joining its threads). Idempotent; also run at interpreter exit,
        so a lost peer is logged here, not raised.

        It never outwaits a failure: after a lost peer, or at an exit that an
        uncaught exception caused (a training collective failed), it does not
        wait for a save still running (a collective with a dead peer), and
        otherwise waits at most the tier's collective timeout; a save left
        running keeps the group (its collective may still be using it) and
        ends with the process.
        """
        if self._closed:
            return
        self._closed = True
        failing = self._lost is not None or getattr(sys, "last_value", None) is not None
        finished = False
        try:
            finished = self._saver.wait(self._save_failed, timeout=0.0 if failing else self.timeout.total_seconds() + 5.0)
        except PeerLost as exc:
            logger.warning("%s", exc)
        finally:
            if finished or not self._saver.busy:
                self._saver.close()
                self._peers.release()
            else:
                logger.warning(
                    "local checkpoint tier at %s: not waiting for the local save of step %s still running%s; it is not committed",
                    self.url, self._saver.pending_step, " after a failure" if failing else f" after {self.timeout}",
                )
                self._saver.close(timeout=0.0)
            self._skips.summary()

    # -- loading ---------------------------------------------------------------

    def holdings(self) -> dict[int, StepHolding]:
        """What this node's folder holds: committed steps, whose own and buddy copies."""
        return node_holdings(self.storage)

    def survey(self) -> list[dict[int, StepHolding]]:
        """Every rank's :meth:`holdings` of this run (collective); other runs' steps are left out with a WARNING."""
        self.wait()
        held = self.holdings()
        if self._run is not None:
            current = self._run()
            for step in sorted(held):
                reason = foreign_reason((held[step].record.extra or {}).get("run"), current)
                if reason is not None:
                    del held[step]
                    if self.node_lead:  # one warning per folder
                        logger.warning("local checkpoint step %d in %s is not loaded: %s", step, self.url, reason)
        return self._all_gather(held)

    def held_steps(self) -> set[int]:
        """The local steps some node holds (collective: a :meth:`survey`, kept for :meth:`reader`)."""
        self._survey = self.survey()
        return {step for holding in self._survey for step in holding}

    def reader(self, step: int) -> StepReader | None:
        """Step ``step`` from the nodes' copies (as surveyed by :meth:`held_steps`), or ``None``. Collective."""
        found = self.load(step, self._survey, _needed)
        if found is None:
            return None
        plan, files = found

        def fetch(saved_rank: int) -> dict[str, Any]:
            return decode(files[saved_rank], f"local copy of saved rank {saved_rank}")

        return StepReader(plan.record, fetch, plan.source, self.url)

    def warn_unusable(self, step: int, error: Exception) -> None:
        """A local step that verified but did not load: the next tier is asked for it."""
        logger.warning("local checkpoint step %d unusable: %s", step, error)

    def loaded(self, step: int) -> None:
        """Nothing to do: steps past ``step`` go at a resume (:meth:`resumed`)."""

    def resumed(self, step: int | None) -> None:
        """Local steps above the one resumed belong to a lost future: remove them."""
        self._survey = []
        self.drop_newer_than(step)

    def load(self, step: int, survey: list[dict[int, StepHolding]], needed: NeededFn) -> tuple[LoadPlan, dict[int, bytearray]] | None:
        """This rank's verified bytes of ``step`` (saved rank -> file), or ``None``. Collective.

        Bad copies are excluded with a warning and the plan is made again, so a
        corrupt own copy falls back to a buddy copy; ``None`` (fall back to the
        cloud) once no plan covers every rank.
        """
        exclude: set[CopyKey] = set()
        while True:
            plan = plan_load(step, self.nodes, survey, needed, exclude)
            if plan is None:
                if self.rank == 0 and (exclude or any(step in s for s in survey)):
                    logger.warning("local tier cannot provide step %d for every rank%s", step, f" (bad copies: {sorted(exclude)})" if exclude else "")
                return None
            if self.rank == 0:
                self._warn_missing_own(plan)
            bad, data = execute_plan(plan, self.storage, self.rank, self.nodes, self._group, self._all_gather)
            if not bad:
                return plan, data
            if self.rank == 0:
                logger.warning("local checkpoint step %d: unusable copies %s; trying other copies", step, sorted(bad))
            exclude |= bad

    def _warn_missing_own(self, plan: LoadPlan) -> None:
        moved = sorted({r.saved_rank for r in plan.reads if r.copy == BUDDY})
        if moved:
            logger.warning("local checkpoint step %d: no usable own copy of saved rank(s) %s (node lost, or copy bad); using buddy copies", plan.step, moved)

    def drop_newer_than(self, step: int | None) -> None:
        """After a resume at ``step``: local steps above it belong to a lost future; remove them."""
        if not self.node_lead:
            return
        try:
            for stale in self.storage.step_dirs():
                if step is None or stale > step:
                    remove_step(self.storage, stale)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not remove stale local checkpoints at %s: %r", self.url, exc)
