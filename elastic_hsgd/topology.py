"""The process groups of each level of a hierarchy, for the current membership.

Every rank resolves the hierarchy (``"local"``, ``"world"``, int sizes), all
ranks agree on the result before any group is made (so a rank that cannot
resolve raises together with the others instead of leaving them hanging), and
then every rank creates every block of every level in the same order, as
:func:`torch.distributed.new_subgroups` does. The groups made here are released
with :func:`release`, by the averager at a rebuild and at interpreter exit.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch.distributed as dist

from .hierarchy import GroupSizeSpec, Level, contiguous_blocks, resolve_levels
from .process_groups import agree, release_group


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
