"""The process groups an averager needs for DTensor parameters, made when it first sees them.

Plain parameters average over each level's block of ranks (:mod:`.topology`).
DTensor parameters hold different slices on the ranks of one replica, so each
rank averages its local shard with the ranks of its block that hold the same
slice: on a 2 replicas x 2 shards mesh, the ``"world"`` level of rank 1 is
ranks ``(1, 3)``. Those rank sets depend on the parameters' mesh and
placements, which the averager learns at its first call; :class:`SliceGroups`
then works them out on every rank (:func:`~elastic_hsgd.topology.plan_slices`),
agrees on them (one small object gather, so that a misfit raises on every rank
instead of leaving some in ``new_group``), and makes the groups, every rank
all of them in the same order. Again after a rebuild, or when the parameter set changes.

A level whose blocks each hold a single replica has nothing to average: it
logs a WARNING once and does nothing when it fires.

Example::

    >>> # xdoctest: +SKIP("needs torch.distributed and DTensor parameters")
    >>> slices = SliceGroups()
    >>> slices.ensure(list(model.parameters()), averager.levels, dist.group.WORLD)
    >>> slices.group(8)        # the ranks holding this rank's slice in the period-8 block
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from .collectives import combine_errors
from .hierarchy import Level
from .local_shards import local_of, placed_all
from .process_groups import agree, release_group
from .sharding import Mesh, local_slice, mesh_replicas
from .topology import SlicePlan, plan_slices

logger = logging.getLogger(__name__)


def layout_digest(params: Sequence[Any], mesh: Mesh, placements: Sequence[Sequence[str]]) -> str:
    """A digest of how the parameters are sharded: each one's global shape, dtype and the slice
    of every position of a replica (the same on every rank, whatever the number of replicas).

    Two replica groups, or a checkpoint and a resumed job, hold the same slices
    on rank ``r`` exactly when their digests agree.

    >>> import torch
    >>> class P:  # a stand-in for a DTensor
    ...     shape, _local_tensor = (13, 5), torch.zeros(7, 5)
    >>> two, three = (Mesh.from_ranks(r, ("replicate", "shard")) for r in ([[0, 1], [2, 3]], [[0, 1], [2, 3], [4, 5]]))
    >>> layout_digest([P()], two, [("Replicate()", "Shard(0)")]) == layout_digest([P()], three, [("Replicate()", "Shard(0)")])
    True
    """
    replica = mesh_replicas(mesh, placements)[0]
    text = []
    for p, texts in zip(params, placements):
        boxes = [local_slice(tuple(p.shape), mesh, texts, rank) for rank in replica]
        text.append(f"{list(p.shape)}:{local_of(p).dtype}:" + ",".join(f"{list(b.offset)}+{list(b.size)}" for b in boxes))
    return hashlib.sha256(";".join(text).encode()).hexdigest()[:16]


class SliceGroups:
    """Per level, the group of the ranks holding this rank's slice; ``None`` for a no-op level.

    Attributes:
        plan: the :class:`~elastic_hsgd.topology.SlicePlan` in use, ``None``
            until DTensor parameters were seen (plain parameters never set it).
        position: this rank's position in its replica (ranks of one position hold the same slices).
        digest: :func:`layout_digest` of the parameters' sharding.
    """

    def __init__(self) -> None:
        self.plan: SlicePlan | None = None
        self.position = 0
        self.digest = ""
        self._groups: dict[int, dist.ProcessGroup | None] = {}
        self._owned: list[dist.ProcessGroup] = []
        self._key: tuple[int, ...] | None = None
        self._warned: set[int] = set()

    @property
    def active(self) -> bool:
        """Whether the averager averages DTensor parameters (groups made)."""
        return self.plan is not None

    def group(self, period: int) -> dist.ProcessGroup | None:
        """The group of the level of ``period`` for this rank's slice, ``None`` for a no-op level."""
        return self._groups.get(period)

    def ensure(
        self, params: list[Any], levels: Sequence[Level], group: dist.ProcessGroup, across_groups: int | None = None
    ) -> bool:
        """Make the groups for ``params`` (DTensors) if not made yet for them. Collective over the default group.

        Returns whether it made them (``False``: already there). Raises on every
        rank, ``TypeError`` for a ``Partial`` placement or parameters on different
        meshes, ``ValueError`` for a level that splits a replica or ranks that
        see different parameters.
        """
        key = tuple(id(p) for p in params)
        if key == self._key:
            return False
        members = dist.get_process_group_ranks(group)
        plan, kind, error, shapes = None, None, None, None
        try:
            mesh, placements = placed_all(list(enumerate(params)))
            plan = plan_slices(mesh, placements, levels, members, across_groups)
            shapes = [(list(p.shape), list(pl)) for p, pl in zip(params, placements)]
        except (TypeError, ValueError) as exc:
            kind, error = type(exc).__name__, str(exc)
        outcomes = agree((kind, error, plan, shapes), group)
        message = combine_errors([e for _, e, _, _ in outcomes], "averaging DTensor parameters")
        if message is not None:
            kinds = [k for k, e, _, _ in outcomes if e is not None]
            raise (TypeError if kinds[0] == "TypeError" else ValueError)(message)
        if any(o[2] != plan or o[3] != shapes for o in outcomes):
            raise ValueError(
                "ranks average DTensor parameters of different global shapes, placements or meshes: "
                + "; ".join(f"rank {r}: {len(o[3] or [])} parameters, replicas {list(o[2].replicas)[:4]}" for r, o in enumerate(outcomes[:4]))
                + ". Build and shard the same model on every rank and pass the same parameters."
            )
        assert plan is not None
        self._make(plan, members, dist.get_rank(group))
        self._key = key
        self.digest = layout_digest(params, mesh, placements)
        self._warn_single(plan, levels, mesh)
        return True

    def _make(self, plan: SlicePlan, members: list[int], rank: int) -> None:
        self.release()
        for period, groups in plan.groups:
            for ranks in groups:
                # Every rank creates every group, in the same order (new_group is collective).
                made = dist.new_group([members[r] for r in ranks])
                self._owned.append(made)
                if rank in ranks:
                    self._groups[period] = made
        for period in plan.single:
            self._groups[period] = None
        self.plan = plan
        self.position = plan.position[rank]

    def _warn_single(self, plan: SlicePlan, levels: Sequence[Level], mesh: Any) -> None:
        for index, level in enumerate(levels):
            if level.period in plan.single and level.period not in self._warned:
                self._warned.add(level.period)
                logger.warning(
                    "level %d (period %d, group size %d) averages groups of a single replica of the sharded model "
                    "on %s (replicas of %d ranks): nothing to average, so it does nothing when it fires. Use a group "
                    "size that spans several replicas (a multiple of %d), or leave the level out.",
                    index, level.period, level.group_size, mesh.describe(), len(plan.replicas[0]), len(plan.replicas[0]),
                )

    def stale(self) -> None:
        """The membership changed: make the groups again at the next :meth:`ensure`."""
        self.release()
        self._key = None
        self.plan = None

    def release(self) -> None:
        """Destroy the groups made here and forget them."""
        for made in self._owned:
            release_group(made)
        self._owned.clear()
        self._groups = {}
