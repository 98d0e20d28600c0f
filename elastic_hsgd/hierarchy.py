"""Pure hierarchy logic: which sizes a configuration resolves to, whether it is
valid, which level fires at which step, and which ranks form which group.

Nothing here touches a process group, so all of it is tested without processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

GroupSizeSpec = Union[int, str]
"""A group size: a positive int, ``"local"`` (processes of one node), ``"world"``
(the whole process group) or ``"replicas"`` (the whole group, averaged across the
replica groups of a fault-tolerant job; top level only)."""

SYMBOLIC_SIZES = ("local", "world", "replicas")
REPLICAS = "replicas"


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: average over groups of ``group_size`` every ``period`` steps."""

    period: int
    group_size: int


def normalize_config(
    period_group_size_dict: Mapping[int, GroupSizeSpec] | Sequence[tuple[int, GroupSizeSpec]],
) -> tuple[tuple[int, GroupSizeSpec], ...]:
    """Check the shape of a configuration that does not depend on the world.

    Returns it as a tuple of ``(period, spec)`` pairs in the given order.
    """
    items = (
        list(period_group_size_dict.items())
        if isinstance(period_group_size_dict, Mapping)
        else [tuple(item) for item in period_group_size_dict]
    )
    if not items:
        raise ValueError(
            "period_group_size_dict is empty: give at least one level, "
            "e.g. {4: 'local', 16: 'world'}."
        )
    previous_period = 0
    normalized: list[tuple[int, GroupSizeSpec]] = []
    for period, spec in items:
        if isinstance(period, bool) or not isinstance(period, int) or period <= 0:
            raise ValueError(
                f"period {period!r} in period_group_size_dict is not a positive int: "
                "periods count optimizer steps, e.g. {2: 2, 8: 'world'}."
            )
        if period <= previous_period:
            raise ValueError(
                f"period {period} follows period {previous_period}: periods must strictly "
                "increase from one level to the next (a level whose period is not larger "
                "than an earlier one's would never fire). Order the dict by period."
            )
        previous_period = period
        normalized.append((period, _check_spec(period, spec)))
    return tuple(normalized)


def _check_spec(period: int, spec: GroupSizeSpec) -> GroupSizeSpec:
    if isinstance(spec, str):
        if spec not in SYMBOLIC_SIZES:
            raise ValueError(
                f"group size {spec!r} for period {period} is not understood: use a positive "
                f"int or one of {SYMBOLIC_SIZES}."
            )
        return spec
    if isinstance(spec, bool) or not isinstance(spec, int) or spec <= 0:
        raise ValueError(
            f"group size {spec!r} for period {period} is not a positive int: use a positive "
            f"int or one of {SYMBOLIC_SIZES}."
        )
    return spec


def resolve_levels(
    config: Sequence[tuple[int, GroupSizeSpec]],
    world_size: int,
    local_world_size: int | None = None,
) -> tuple[Level, ...]:
    """Resolve symbolic sizes against a membership and validate the result.

    ``local_world_size`` is needed only when a level says ``"local"``.
    """
    if world_size <= 0:
        raise ValueError(f"world_size {world_size} must be positive.")
    levels = []
    for period, spec in config:
        # Inside a replica group the replicas level spans the whole group; the
        # part across groups is the top-level object's business, not a subgroup.
        if spec in ("world", REPLICAS):
            size = world_size
        elif spec == "local":
            if local_world_size is None or local_world_size <= 0:
                raise ValueError(
                    f"group size 'local' for period {period} needs the number of processes per "
                    f"node, but local_world_size is {local_world_size!r}: run under torchrun "
                    "(which sets LOCAL_WORLD_SIZE) or pass local_world_size."
                )
            size = local_world_size
        else:
            size = int(spec)
        levels.append(Level(period, size))
    validate_levels(levels, world_size)
    return tuple(levels)


def validate_levels(levels: Sequence[Level], world_size: int) -> None:
    """Raise ``ValueError`` unless the levels nest and end at the whole world."""
    for lower, upper in zip(levels, levels[1:]):
        if upper.group_size < lower.group_size:
            raise ValueError(
                f"group size {upper.group_size} (period {upper.period}) is smaller than "
                f"{lower.group_size} (period {lower.period}): group sizes must not decrease "
                "from one level to the next."
            )
        if upper.group_size % lower.group_size:
            raise ValueError(
                f"group size {lower.group_size} (period {lower.period}) does not divide "
                f"{upper.group_size} (period {upper.period}): each level's groups must nest "
                "inside the next level's groups."
            )
    for level in levels:
        if world_size % level.group_size:
            raise ValueError(
                f"group size {level.group_size} (period {level.period}) does not divide the "
                f"world size {world_size}: use a divisor of {world_size}, or 'local'/'world' "
                "so the size follows the membership."
            )
    top = levels[-1]
    if top.group_size != world_size:
        raise ValueError(
            f"the last level (period {top.period}) has group size {top.group_size} but the "
            f"world size is {world_size}: the top level must span the whole process group; "
            "use 'world' for it."
        )


def check_replicas_level(config: Sequence[tuple[int, GroupSizeSpec]], fault_tolerant: bool) -> None:
    """Raise ``ValueError`` unless ``"replicas"`` is the top level exactly when fault tolerant.

    In a fault-tolerant job (torchft, several replica groups) the last level must
    be ``"replicas"``: any other top level would leave the groups never averaged
    with each other. Outside one, ``"replicas"`` has nothing to span.
    """
    specs = [spec for _, spec in config]
    for period, spec in config[:-1]:
        if spec == REPLICAS:
            raise ValueError(
                f"group size 'replicas' for period {period} is not the last level: 'replicas' "
                "spans every replica group and must be the top level, e.g. {2: 'local', 8: 'world', 32: 'replicas'}."
            )
    top_period, top_spec = config[-1]
    if fault_tolerant and top_spec != REPLICAS:
        raise ValueError(
            f"this job runs fault-tolerant replica groups (TORCHFT_LIGHTHOUSE is set) but the top "
            f"level of hierarchy {dict(config)} is {top_spec!r} (period {top_period}): make the last "
            f"level 'replicas', e.g. {{{', '.join(f'{p}: {s!r}' for p, s in config)}, {4 * top_period}: 'replicas'}}."
        )
    if not fault_tolerant and REPLICAS in specs:
        raise ValueError(
            f"hierarchy {dict(config)} has a 'replicas' level but this job has no replica groups: "
            "'replicas' needs the fault-tolerant mode (torchft installed, TORCHFT_LIGHTHOUSE set, a "
            "top level from elastic_hsgd.ft); use 'world' for the top level otherwise."
        )


def repeated_group_sizes(levels: Sequence[Level]) -> list[tuple[Level, Level]]:
    """Neighbouring levels that resolved to the same group size.

    Valid, but the lower level then averages the same groups as the upper one
    at a shorter period: e.g. ``{2: "local", 8: "world"}`` on one node, where
    ``"local"`` is the whole world.
    """
    return [(lower, upper) for lower, upper in zip(levels, levels[1:]) if lower.group_size == upper.group_size]


def level_for_step(step: int, warmup_steps: int, periods: Sequence[int]) -> int | None:
    """Index of the level that averages at ``step``, or ``None``.

    torch's semantics: nothing during warmup; afterwards the level with the
    largest period dividing the absolute step (not step - warmup).
    """
    if step < warmup_steps:
        return None
    for index in range(len(periods) - 1, -1, -1):
        if step % periods[index] == 0:
            return index
    return None


def contiguous_blocks(world_size: int, group_size: int) -> list[list[int]]:
    """Group ranks ``0..world_size-1`` into contiguous blocks, as ``new_subgroups`` does."""
    if group_size <= 0 or world_size % group_size:
        raise ValueError(f"group size {group_size} does not divide world size {world_size}.")
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def block_of(rank: int, group_size: int) -> list[int]:
    """The contiguous block of ranks that ``rank`` averages with at ``group_size``."""
    start = rank - rank % group_size
    return list(range(start, start + group_size))
