"""Where the local tier's copies go and how a new world reads them back, as pure functions.

Every rank's state is kept on its own node and, as a buddy copy, on another
node (:func:`buddy_ranks`). To resume, every rank reports what its node's
folder holds (:class:`StepHolding`) and :func:`plan_load` decides who reads
which copy for whom (:class:`LoadPlan`): own node first, then another node's
copy sent over. The tier's I/O lives in :mod:`.tiers.local`.

Example::

    >>> buddy_ranks([0, 0, 1, 1])
    [2, 3, 0, 1]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .layout import CommitRecord

OWN, BUDDY = "own", "buddy"

# Which saved ranks a new rank needs: (rank, saved_world_size, world_size) -> saved ranks.
NeededFn = Callable[[int, int, int], Sequence[int]]


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
    """How the new world reads ``step`` (one version of it, ``record``): every :class:`Read`."""

    step: int
    record: CommitRecord
    reads: tuple[Read, ...]

    @property
    def source(self) -> str:
        """``"local"`` when every rank reads its own node's own copies, else ``"buddy"``."""
        return "local" if all(r.holder == r.rank and r.copy == OWN for r in self.reads) else "buddy"


#: One copy of one saved rank's file: (node, step, saved rank, OWN | BUDDY).
CopyKey = tuple[int, int, int, str]


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
    """Every rank's reads of one version of ``step`` (held by ``by_node``), or ``None`` if a needed file has no copy."""
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

