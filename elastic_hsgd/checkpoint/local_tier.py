"""A node-local checkpoint tier with a copy of every rank's state on another node.

Host memory (``/dev/shm``, a Kubernetes ``emptyDir`` with ``medium: Memory``)
survives a worker restart, and a copy on another node survives losing a node,
so this tier can be written every few steps where the cloud tier cannot. Each
node has its own folder (``local_url``); nodes never share it::

    <local_url>/step_000000000105/rank_00001.safetensors          rank 1's own state (rank 1 lives here)
    <local_url>/step_000000000105/buddy/rank_00003.safetensors    a copy of rank 3's state, held for it
    <local_url>/step_000000000105/COMMIT.json               written last, by the node's lowest rank

The bytes, checksums and commit record are the cloud tier's
(:func:`~.state.serialize`, :class:`~.layout.CommitRecord`): a node writes its
commit record only after every rank of the world reported its own file and
its buddy's copy written with matching checksums, so a local step exists only
once it is complete everywhere.

Saving blocks only for the staging copy (the encoded state into a reused host
buffer); writing, the transfer to the buddy (gloo send/recv on the tier's own
group) and the commit run in a background thread.

Two kinds of failed save. A storage failure (a write, a checksum) is agreed by
every rank over the tier's group, which stays usable: it is logged and training
goes on (the cloud tier is unaffected). A failed collective (a peer died or
timed out) leaves the group unusable and the world short of a member: the next
save, :meth:`LocalTier.wait` or load raises :class:`PeerLost`, so the worker
exits and torchelastic restarts the world, which resumes from the newest step
committed everywhere (the interrupted one never is).

Loading is planned from what every rank reports (:func:`plan_load`, pure): the
newest step for which each rank the new world needs can be read from its own
node's folder (``"local"``) or from a copy held elsewhere, sent over the tier's
group (``"buddy"``). A copy that fails its checksum is excluded with a warning
and the plan is made again.

Example::

    >>> # xdoctest: +SKIP("needs a process group")
    >>> manager = CheckpointManager("s3://bucket/run", every=100, local_url="/dev/shm/ckpt", local_every=5)
    >>> for step in range(start, steps):
    ...     train_step()
    ...     manager.maybe_save(step + 1, state)   # local every 5 steps, cloud every 100
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..process_groups import release_at_exit, release_group
from .layout import COMMIT_NAME, CommitRecord, FileEntry, plan_retention, rank_file_name, step_dir_name
from .state import serialize
from .storage import CheckpointError, Storage, checksum_of

logger = logging.getLogger(__name__)

BUDDY_DIR = "buddy"
OWN, BUDDY = "own", "buddy"

# Which saved ranks a new rank needs: (rank, saved_world_size, world_size) -> saved ranks.
NeededFn = Callable[[int, int, int], Sequence[int]]


# -- pure planning -------------------------------------------------------------


def buddy_ranks(nodes: Sequence[int]) -> list[int | None]:
    """The rank that keeps a copy of each rank's state.

    ``nodes[r]`` is rank r's node. The copy goes to the rank at the same
    position on the next node (nodes in sorted order, wrapping), so losing one
    node loses no state when there are two or more. With one node it goes to
    the next rank on that node; alone, a rank has no buddy (``None``).

    >>> buddy_ranks([0, 0, 1, 1])
    [2, 3, 0, 1]
    >>> buddy_ranks([0, 0, 0])
    [1, 2, 0]
    """
    ranks_on: dict[int, list[int]] = {}
    for rank, node in enumerate(nodes):
        ranks_on.setdefault(node, []).append(rank)
    order = sorted(ranks_on)
    buddies: list[int | None] = []
    for rank, node in enumerate(nodes):
        here = ranks_on[node]
        position = here.index(rank)
        if len(order) > 1:
            there = ranks_on[order[(order.index(node) + 1) % len(order)]]
            buddies.append(there[position % len(there)])
        else:
            buddies.append(here[(position + 1) % len(here)] if len(here) > 1 else None)
    return buddies


def record_digest(record: CommitRecord) -> str:
    """Identifies a step's content: same files and checksums, same digest (commit times may differ per node)."""
    key = json.dumps([record.step, record.world_size, sorted((f.name, f.checksum, f.bytes) for f in record.files)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StepHolding:
    """What one node's folder holds of one committed local step."""

    record: CommitRecord
    own: frozenset[int]
    buddy: frozenset[int]


@dataclass(frozen=True)
class Read:
    """``holder`` reads saved rank ``saved_rank``'s ``copy`` from its node's folder for ``rank``."""

    rank: int
    saved_rank: int
    holder: int
    copy: str  # OWN or BUDDY


@dataclass(frozen=True)
class LoadPlan:
    step: int
    record: CommitRecord
    reads: tuple[Read, ...]

    @property
    def source(self) -> str:
        """``"local"`` when every rank reads its own node's own copies, else ``"buddy"``."""
        return "local" if all(r.holder == r.rank and r.copy == OWN for r in self.reads) else "buddy"


CopyKey = tuple[int, int, int, str]  # (node, step, saved rank, OWN | BUDDY)


def plan_load(
    step: int,
    nodes: Sequence[int],
    holdings: Sequence[dict[int, StepHolding]],
    needed: NeededFn,
    exclude: frozenset[CopyKey] | set[CopyKey] = frozenset(),
) -> LoadPlan | None:
    """How every rank of the new world gets what it needs of ``step``, or ``None``.

    ``nodes[r]`` is rank r's node now and ``holdings[r]`` what r's node folder
    holds. Each rank prefers its node's own copy, then its node's buddy copy
    (neither needs the network), then a copy on another node, read there by
    one of that node's ranks and sent over. Copies in ``exclude`` (found bad)
    are not used. Versions of ``step`` with different content (a step redone
    after a roll-back) are never mixed.
    """
    ranks_on: dict[int, list[int]] = {}
    by_node: dict[int, StepHolding] = {}
    for rank, node in enumerate(nodes):
        ranks_on.setdefault(node, []).append(rank)
        if node not in by_node and step in holdings[rank]:
            by_node[node] = holdings[rank][step]
    versions: dict[str, list[int]] = {}
    for node, holding in sorted(by_node.items()):
        versions.setdefault(record_digest(holding.record), []).append(node)
    # The most recently committed version first (a redo after a roll-back is newer); the digest breaks ties.
    newest = {d: max(by_node[n].record.unix_time for n in ns) for d, ns in versions.items()}
    for digest, version_nodes in sorted(versions.items(), key=lambda kv: (-newest[kv[0]], kv[0])):
        record = by_node[version_nodes[0]].record
        reads = _reads_for(step, record.world_size, nodes, ranks_on, {n: by_node[n] for n in version_nodes}, needed, exclude)
        if reads is not None:
            return LoadPlan(step, record, tuple(reads))
    return None


def _reads_for(step, saved_world, nodes, ranks_on, by_node, needed, exclude) -> list[Read] | None:
    reads = []
    for rank, node in enumerate(nodes):
        for saved in needed(rank, saved_world, len(nodes)):
            read = None
            # Own node first (no transfer), then the other nodes in order.
            for where in [node, *sorted(n for n in by_node if n != node)]:
                holding = by_node.get(where)
                if holding is None:
                    continue
                for copy, held in ((OWN, holding.own), (BUDDY, holding.buddy)):
                    if saved in held and (where, step, saved, copy) not in exclude:
                        readers = ranks_on[where]
                        read = Read(rank, saved, rank if where == node else readers[rank % len(readers)], copy)
                        break
                if read is not None:
                    break
            if read is None:
                return None
            reads.append(read)
    return reads


# -- the tier ------------------------------------------------------------------


class PeerLost(CheckpointError):
    """A collective of the local tier failed: a peer died or timed out, and the
    tier's group is unusable. Let it end the worker, so torchelastic restarts the world."""


def node_from_env() -> int:
    """This process's node: torchrun's ``GROUP_RANK`` (one per agent), 0 without it."""
    value = os.environ.get("GROUP_RANK", "")
    return int(value) if value else 0


class LocalTier:
    """Node-local checkpoints of every rank, plus a buddy copy on another node.

    Construction is collective when ``torch.distributed`` is initialised (it
    creates the tier's own gloo group and learns every rank's node). The
    :class:`~.manager.CheckpointManager` drives it; see its ``local_url``.
    """

    def __init__(
        self,
        url: str,
        *,
        keep: int = 2,
        storage_options: dict[str, Any] | None = None,
        timeout: timedelta = timedelta(minutes=10),
        node: int | None = None,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"local_keep={keep!r} must be an int >= 1 (how many local checkpoints to keep).")
        self.url = url
        self.keep = keep
        self.storage = Storage(url, storage_options)
        node = node_from_env() if node is None else node
        self._lost: PeerLost | None = None  # set once a collective failed: the group is unusable from then on
        if dist.is_available() and dist.is_initialized():
            # Its own group: saves run collectives and send/recv from a background
            # thread, which must never interleave with the cloud tier's or training's.
            self._group: dist.ProcessGroup | None = dist.new_group(backend="gloo", timeout=timeout)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self._group, self.rank, self.world_size = None, 0, 1
        try:
            self.storage.check_writable()
            error = None
        except CheckpointError as exc:
            error = str(exc)
        gathered = self._all_gather((node, error))
        failed = [(r, e) for r, (_, e) in enumerate(gathered) if e]
        if failed:
            raise CheckpointError(f"local checkpoint tier unusable on {len(failed)} rank(s): " + "; ".join(f"rank {r}: {e}" for r, e in failed[:4]))
        self.nodes = [n for n, _ in gathered]
        self.node = node
        self.buddies = buddy_ranks(self.nodes)
        self.committed_step: int | None = None  # newest step this process saw committed everywhere
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[None]] | None = None
        self._blob = bytearray()  # the staging buffer, reused while the state's size is unchanged
        self._closed = False
        # Its gloo group must be gone before the interpreter finalizes, manager or not
        # (see elastic_hsgd/process_groups.py); close() is idempotent.
        release_at_exit(self.close)

    def _all_gather(self, obj: Any) -> list[Any]:
        self._raise_if_lost()
        if self._group is None:
            if self.world_size > 1:
                raise CheckpointError(f"the local checkpoint tier at {self.url} is closed: it cannot save or load any more.")
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    @property
    def node_lead(self) -> bool:
        """The lowest rank of this node writes its folder's commit records and prunes it."""
        return self.nodes.index(self.node) == self.rank

    # -- saving ----------------------------------------------------------------

    def save(self, step: int, payload: dict[str, Any], entries: dict | None, extra: dict | None) -> None:
        """Stage ``payload`` (the only blocking part) and write, copy and commit it in the background.

        ``payload`` may reference live tensors: it is encoded into the staging
        buffer before this returns. Waits for the previous local save first (all
        ranks do, so their background collectives stay in step).
        """
        step_dir_name(step)
        if self._closed:
            raise CheckpointError(f"the local checkpoint tier at {self.url} is closed: it cannot save any more.")
        self.wait()
        self._raise_if_lost()
        chunks = [memoryview(c).cast("B") for c in serialize(payload)]
        size = sum(c.nbytes for c in chunks)
        if len(self._blob) != size:
            self._blob = bytearray(size)
        view, offset = memoryview(self._blob), 0
        for chunk in chunks:
            view[offset : offset + chunk.nbytes] = chunk
            offset += chunk.nbytes
        del chunks, view
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elastic-hsgd-local-ckpt")
        self._pending = (step, self._executor.submit(self._write_copy_commit, step, self._blob, entries, extra))

    def wait(self) -> None:
        """Block until the pending local save finished.

        A save every rank agreed failed (storage) is logged, not raised: the
        local tier only shortens recovery, and the cloud tier is unaffected. A
        save whose collective failed raises :class:`PeerLost`: a peer is gone
        (or hung) and training on would only run further from the last
        committed step, unprotected; exiting lets torchelastic re-form the world.
        """
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        try:
            future.result()
        except CheckpointError as exc:
            logger.warning("local checkpoint of step %d at %s failed (the cloud tier is unaffected): %s", step, self.url, exc)
        except Exception as exc:  # noqa: BLE001 - a collective of the tier's group failed
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
        so a lost peer is logged here, not raised."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        except PeerLost as exc:
            logger.warning("%s", exc)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            release_group(self._group)
            self._group = None

    def _write_copy_commit(self, step: int, blob: bytearray, entries: dict | None, extra: dict | None) -> None:
        started = time.perf_counter()
        step_dir = self.storage.path(step_dir_name(step))
        name = rank_file_name(self.rank)
        own: tuple[str, str, int] | None = None
        held: dict[int, str] = {}
        error = None
        try:
            # A step redone after a roll-back: its old commit must not vouch for the new files.
            self.storage.rm_file(f"{step_dir}/{COMMIT_NAME}")
            digest, nbytes = self.storage.write_file(f"{step_dir}/{name}", [blob])
            own = (name, digest, nbytes)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the exchange and gather below
            error = f"writing {name}: {exc!r}"
        received = self._exchange_with_buddy(blob)
        for sender, data in received.items():
            try:
                held[sender] = self.storage.write_file(f"{step_dir}/{BUDDY_DIR}/{rank_file_name(sender)}", [data])[0]
            except Exception as exc:  # noqa: BLE001
                error = f"writing the copy of rank {sender}: {exc!r}"
        reports = self._all_gather((own, held, error))
        problems = [f"rank {r}: {e}" for r, (_, _, e) in enumerate(reports) if e]
        for holder, (_, holder_held, _) in enumerate(reports):
            for sender, digest in holder_held.items():
                sent = reports[sender][0]
                if sent is not None and sent[1] != digest:
                    problems.append(f"rank {holder}'s copy of rank {sender} has checksum {digest}, rank {sender} wrote {sent[1]}")
        commit_error = None
        if not problems and self.node_lead:
            record = CommitRecord(
                step=step, world_size=self.world_size, files=tuple(FileEntry(*o) for o, _, _ in reports),
                unix_time=time.time(), entries=entries, extra={**(extra or {}), "tier": "local"},
            )
            try:
                self.storage.write_atomic(f"{step_dir}/{COMMIT_NAME}", json.dumps(record.to_json(), indent=1).encode())
                self._apply_retention(step)
            except Exception as exc:  # noqa: BLE001
                commit_error = f"committing in {self.url}: {exc!r}"
        commit_errors = self._all_gather(commit_error)
        problems += [f"rank {r}: {e}" for r, e in enumerate(commit_errors) if e]
        if problems:
            raise CheckpointError(f"local checkpoint of step {step} not committed: " + "; ".join(problems[:4]))
        self.committed_step = step
        if self.rank == 0:
            logger.info("local checkpoint step %d committed: %.1f MB per rank, %.3f s", step, len(blob) / 1e6, time.perf_counter() - started)

    def _exchange_with_buddy(self, blob: bytearray) -> dict[int, bytearray]:
        """Send our bytes to our buddy and receive the bytes of everyone whose buddy we are (sizes first)."""
        if self._group is None:
            return {}
        sends, outgoing = [], []
        buddy = self.buddies[self.rank]
        if buddy is not None:
            # The tensors stay referenced until the sends complete.
            outgoing = [torch.tensor([len(blob)], dtype=torch.int64), torch.frombuffer(blob, dtype=torch.uint8)]
            sends = [dist.isend(t, buddy, group=self._group, tag=tag) for tag, t in enumerate(outgoing)]
        received = {}
        for sender in (s for s, b in enumerate(self.buddies) if b == self.rank):
            size = torch.empty(1, dtype=torch.int64)
            dist.recv(size, sender, group=self._group, tag=0)
            out = bytearray(int(size.item()))
            dist.recv(torch.frombuffer(out, dtype=torch.uint8), sender, group=self._group, tag=1)
            received[sender] = out
        for work in sends:
            work.wait()
        del outgoing
        return received

    def _apply_retention(self, just_committed: int) -> None:
        try:
            drop_committed, drop_partial = plan_retention(self.storage.committed_steps(), self.storage.step_dirs(), self.keep, just_committed)
            for step in drop_committed + drop_partial:
                if step in drop_committed:
                    self.storage.rm_file(self.storage.commit_path(step))  # the record first: never half "committed"
                self.storage.remove_tree(self.storage.path(step_dir_name(step)))
        except Exception as exc:  # noqa: BLE001 - retention must never fail a committed save
            logger.warning("could not apply local retention (keep=%d) at %s: %r", self.keep, self.url, exc)

    # -- loading ---------------------------------------------------------------

    def holdings(self) -> dict[int, StepHolding]:
        """What this node's folder holds: committed steps, whose own and buddy copies."""
        held: dict[int, StepHolding] = {}
        for step in self.storage.committed_steps():
            step_dir = self.storage.path(step_dir_name(step))
            try:
                record = CommitRecord.from_json(json.loads(self.storage.read_file(self.storage.commit_path(step))))
                names = set(self.storage.list_names(step_dir))
                buddy_names = set(self.storage.list_names(f"{step_dir}/{BUDDY_DIR}"))
            except Exception as exc:  # noqa: BLE001 - an unreadable step is simply not offered
                logger.warning("local checkpoint step %d at %s is unreadable, skipping it: %r", step, self.url, exc)
                continue
            ranks = range(record.world_size)
            held[step] = StepHolding(
                record,
                frozenset(r for r in ranks if rank_file_name(r, record.format) in names),
                frozenset(r for r in ranks if rank_file_name(r, record.format) in buddy_names),
            )
        return held

    def survey(self) -> list[dict[int, StepHolding]]:
        """Every rank's :meth:`holdings` (collective)."""
        self.wait()
        return self._all_gather(self.holdings())

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
            bad, data = self._execute(plan)
            if not bad:
                return plan, data
            if self.rank == 0:
                logger.warning("local checkpoint step %d: unusable copies %s; trying other copies", step, sorted(bad))
            exclude |= bad

    def _warn_missing_own(self, plan: LoadPlan) -> None:
        moved = sorted({r.saved_rank for r in plan.reads if r.copy == BUDDY})
        if moved:
            logger.warning("local checkpoint step %d: no usable own copy of saved rank(s) %s (node lost, or copy bad); using buddy copies", plan.step, moved)

    def _execute(self, plan: LoadPlan) -> tuple[set[CopyKey], dict[int, bytearray]]:
        """Read and verify what this rank holds for the plan, then send/receive across nodes."""
        step_dir = self.storage.path(step_dir_name(plan.step))
        mine: dict[int, bytearray] = {}
        outgoing: list[tuple[int, Read, bytearray]] = []
        bad: list[CopyKey] = []
        for index, read in enumerate(plan.reads):
            if read.holder != self.rank:
                continue
            entry = plan.record.file_for_rank(read.saved_rank)
            folder = step_dir if read.copy == OWN else f"{step_dir}/{BUDDY_DIR}"
            try:
                data = _read_verified(self.storage, f"{folder}/{entry.name}", entry)
            except Exception as exc:  # noqa: BLE001 - reported collectively
                logger.warning("local %s copy %s of step %d on rank %d is unusable: %s", read.copy, entry.name, plan.step, self.rank, exc)
                bad.append((self.node, plan.step, read.saved_rank, read.copy))
                continue
            if read.rank == self.rank:
                mine[read.saved_rank] = data
            else:
                outgoing.append((index, read, data))
        all_bad = {tuple(k) for b in self._all_gather(bad) for k in b}
        if all_bad:
            return all_bad, {}  # type: ignore[return-value]
        sends = [
            dist.isend(torch.frombuffer(data, dtype=torch.uint8), read.rank, group=self._group, tag=index)
            for index, read, data in outgoing
        ]
        for index, read in enumerate(plan.reads):
            if read.rank == self.rank and read.holder != self.rank:
                entry = plan.record.file_for_rank(read.saved_rank)
                data = bytearray(entry.bytes)
                dist.recv(torch.frombuffer(data, dtype=torch.uint8), read.holder, group=self._group, tag=index)
                try:
                    _verify(data, entry)
                    mine[read.saved_rank] = data
                except CheckpointError as exc:
                    logger.warning("copy %s of step %d received from rank %d is unusable: %s", entry.name, plan.step, read.holder, exc)
                    bad.append((self.nodes[read.holder], plan.step, read.saved_rank, read.copy))
        for work in sends:
            work.wait()
        all_bad = {tuple(k) for b in self._all_gather(bad) for k in b}
        return all_bad, ({} if all_bad else mine)  # type: ignore[return-value]

    def drop_newer_than(self, step: int | None) -> None:
        """After a resume at ``step``: local steps above it belong to a lost future; remove them."""
        if not self.node_lead:
            return
        try:
            for stale in self.storage.step_dirs():
                if step is None or stale > step:
                    self.storage.rm_file(self.storage.commit_path(stale))
                    self.storage.remove_tree(self.storage.path(step_dir_name(stale)))
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not remove stale local checkpoints at %s: %r", self.url, exc)


def _read_verified(storage: Storage, path: str, entry: FileEntry) -> bytearray:
    size = storage.size(path)
    if size != entry.bytes:
        raise CheckpointError(f"{entry.name} has {size} bytes, commit record says {entry.bytes}")
    data, checksum = storage.read_into(path, entry.bytes)
    if checksum != entry.checksum:
        raise CheckpointError(f"{entry.name} is corrupt: its checksum differs from the commit record")
    return data


def _verify(data: bytearray, entry: FileEntry) -> None:
    if len(data) != entry.bytes:
        raise CheckpointError(f"{entry.name} is truncated: {len(data)} bytes, commit record says {entry.bytes}")
    if checksum_of(data) != entry.checksum:
        raise CheckpointError(f"{entry.name} is corrupt: its checksum differs from the commit record")
