"""The process groups of each level of a hierarchy, for the current membership.

Every rank resolves the hierarchy (``"local"``, ``"world"``, int sizes), all
ranks agree on the result before any group is made (so a rank that cannot
resolve raises together with the others instead of leaving them hanging), and
then every rank creates every block of every level in the same order, as
:func:`torch.distributed.new_subgroups` does. The groups made here are released
with :func:`release`, by the averager at a rebuild and at interpreter exit.

DTensor parameters (FSDP2, HSDP, tensor parallel) average with fewer ranks: a
rank averages its local shard with the ranks of its level's block that hold
the same slice in the other replicas. :func:`plan_slices` works out those rank
sets from the parameters' mesh and placements (pure, with
:mod:`elastic_hsgd.sharding`); :mod:`elastic_hsgd.shard_groups` makes them.
Group sizes keep counting ranks: on a 2 replicas x 2 shards mesh, ``"world"``
is 4 ranks, and each of its groups is the 2 ranks holding one slice.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist

from .hierarchy import REPLICAS, GroupSizeSpec, Level, contiguous_blocks, repeated_group_sizes, resolve_levels
from .process_groups import agree, release_group
from .sharding import Mesh, check_levels, mesh_replicas

logger = logging.getLogger(__name__)


def local_world_size(given: int | None) -> int | None:
    """``given``, else ``LOCAL_WORLD_SIZE`` from the environment (torchrun sets it), else ``None``."""
    if given is None and "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return given


def resolve_on_every_rank(
    config: Sequence[tuple[int, GroupSizeSpec]], group: dist.ProcessGroup, local_size: int | None
) -> tuple[Level, ...]:
    """The hierarchy's levels for ``group``'s world, the same on every rank. Collective.

    Raises ``ValueError`` on every rank if any rank cannot resolve it, or if
    ranks resolve it differently (``"local"`` differs between nodes).

    Example::

        >>> # xdoctest: +SKIP("needs torch.distributed")
        >>> resolve_on_every_rank(((2, "local"), (8, "world")), dist.group.WORLD, local_size=2)
        (Level(period=2, group_size=2), Level(period=8, group_size=4))
    """
    world_size = dist.get_world_size(group)
    try:
        levels: tuple[Level, ...] | None = resolve_levels(config, world_size, local_size)
        error = None
    except ValueError as exc:
        levels, error = None, str(exc)
    # "local" can differ between nodes, and a rank that raises alone would
    # leave the others hanging in new_group: agree first, then fail together.
    outcomes = agree((levels, error), group)
    errors = sorted({e for _, e in outcomes if e is not None})
    if errors:
        raise ValueError(f"hierarchy {dict(config)} does not fit world size {world_size}: {errors[0]}")
    if len({lv for lv, _ in outcomes}) != 1:
        raise ValueError(
            f"ranks resolved hierarchy {dict(config)} differently ({sorted({str(lv) for lv, _ in outcomes})}): "
            "'local' must mean the same number of processes on every node."
        )
    assert levels is not None
    return levels


def new_level_groups(
    levels: Sequence[Level], group: dist.ProcessGroup, owned: list[dist.ProcessGroup]
) -> OrderedDict[int, dist.ProcessGroup]:
    """Period -> this rank's group of each level; collective over the default group.

    A level spanning all of ``group`` uses ``group`` itself; every subgroup made
    is appended to ``owned`` (also those this rank is not in), for :func:`release`.
    """
    world_size = dist.get_world_size(group)
    member_ranks = dist.get_process_group_ranks(group)
    my_group_rank = dist.get_rank(group)
    by_size: dict[int, dist.ProcessGroup] = {world_size: group}
    by_period: OrderedDict[int, dist.ProcessGroup] = OrderedDict()
    for level in levels:
        if level.group_size not in by_size:
            # Every rank creates every block, in the same order, as new_subgroups does.
            for block in contiguous_blocks(world_size, level.group_size):
                subgroup = dist.new_group([member_ranks[i] for i in block])
                owned.append(subgroup)
                if my_group_rank in block:
                    by_size[level.group_size] = subgroup
        by_period[level.period] = by_size[level.group_size]
    return by_period


def release(owned: list[dist.ProcessGroup]) -> None:
    """Destroy the subgroups in ``owned`` and empty it (see :mod:`elastic_hsgd.process_groups`)."""
    for subgroup in owned:
        release_group(subgroup)
    owned.clear()


# -- sharded (DTensor) parameters: the ranks that hold the same slice --------------------


@dataclass(frozen=True)
class SlicePlan:
    """Which ranks average together for DTensor parameters, in ranks of the averager's group.

    ``replicas`` are the rank sets that each hold one whole copy of the model;
    ranks at the same ``position`` inside their replica hold the same slice of
    every parameter. ``groups`` lists, per level, every group to create (in
    the order every rank creates them): the ranks of one of the level's blocks
    at one position. ``single``: the levels whose blocks hold one replica,
    which have nothing to average (no-ops).

    Example (FSDP2 over the shard dim of a 2 x 2 mesh)::

        >>> mesh = Mesh.from_ranks([[0, 1], [2, 3]], ("replicate", "shard"))
        >>> plan = plan_slices(mesh, [("Replicate()", "Shard(0)")], [Level(2, 2), Level(4, 4)], [0, 1, 2, 3])
        >>> plan.single, plan.group_of(4, 1)
        ((2,), (1, 3))
    """

    replicas: tuple[tuple[int, ...], ...]
    position: tuple[int, ...]
    groups: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...]
    single: tuple[int, ...]

    def group_of(self, period: int, rank: int) -> tuple[int, ...] | None:
        """The ranks ``rank`` averages with at ``period``; ``None`` for a no-op level."""
        for level_period, groups in self.groups:
            if level_period == period:
                return next((g for g in groups if rank in g), None)
        return None


def plan_slices(
    mesh: Mesh,
    placements: Sequence[Sequence[str]],
    levels: Sequence[Level],
    members: Sequence[int],
    across_groups: int | None = None,
) -> SlicePlan:
    """The :class:`SlicePlan` of parameters on ``mesh`` (global ranks) for ``levels`` of the group whose
    global ranks are ``members`` (in group-rank order).

    Every level's blocks must be unions of whole replicas: ``ValueError`` naming
    the level, the mesh and the fix (:func:`~elastic_hsgd.sharding.check_levels`).
    ``across_groups``: the period of a ``"replicas"`` top level, which averages
    across replica groups and so is no no-op even when this group is one replica.
    """
    index = {rank: i for i, rank in enumerate(members)}
    outside = [r for r in mesh.ranks if r not in index]
    if outside:
        raise ValueError(
            f"the parameters are on {mesh.describe()}, whose ranks {outside[:8]} are not in the averager's process "
            f"group (global ranks {list(members)[:16]}): build the device mesh over the averager's process group."
        )
    local = Mesh(mesh.shape, tuple(index[r] for r in mesh.ranks), mesh.dims)
    single = check_levels(local, placements, levels, len(members))
    replicas = mesh_replicas(local, placements)
    position = [0] * len(members)
    for replica in replicas:
        for k, rank in enumerate(replica):
            position[rank] = k
    size = len(replicas[0])
    groups = []
    for level in levels:
        if level in single and level.period != across_groups:
            continue
        made = [
            tuple(r for r in block if position[r] == k)
            for block in contiguous_blocks(len(members), level.group_size)
            for k in range(size)
        ]
        groups.append((level.period, tuple(made)))
    skipped = tuple(lv.period for lv in single if lv.period != across_groups)
    return SlicePlan(tuple(replicas), tuple(position), tuple(groups), skipped)


def log_hierarchy(
    config: Sequence[tuple[int, GroupSizeSpec]], levels: Sequence[Level], group: dist.ProcessGroup,
    local_size: int | None, warmup_steps: int, log: logging.Logger = logger,
) -> None:
    """Log the resolved hierarchy to ``log``; on rank 0 a WARNING for neighbouring levels of the same group size."""
    world_size = dist.get_world_size(group)
    spec = dict(config)
    if dist.get_rank(group) == 0:
        for lower, upper in repeated_group_sizes(levels):
            if spec[upper.period] == REPLICAS:
                continue  # spans every replica group, beyond this group
            log.warning(
                "levels %s (period %d) and %s (period %d) both resolve to groups of %d with world size %d "
                "(local world size %s): the lower level averages the same group as the upper one, just more "
                "often. On one node 'local' is the whole world; use an int group size or run on more nodes.",
                spec[lower.period], lower.period, spec[upper.period], upper.period,
                lower.group_size, world_size, local_size,
            )
    log.info(
        "averaging hierarchy for world size %d: %s (warmup %d steps)",
        world_size,
        ", ".join(f"groups of {lv.group_size} every {lv.period} steps" for lv in levels),
        warmup_steps,
    )
