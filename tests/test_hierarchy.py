"""Pure hierarchy logic, without processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_hsgd.hierarchy import (
    Level,
    block_of,
    contiguous_blocks,
    level_for_step,
    normalize_config,
    resolve_levels,
)


def test_resolves_symbolic_sizes():
    config = normalize_config({2: "local", 8: "world"})
    assert resolve_levels(config, world_size=8, local_world_size=2) == (Level(2, 2), Level(8, 8))
    assert resolve_levels(config, world_size=4, local_world_size=2) == (Level(2, 2), Level(8, 4))


def test_equal_sizes_are_allowed_like_torchs_own_tests():
    assert resolve_levels(normalize_config({2: 2, 4: 4, 8: 4}), 4)[-1] == Level(8, 4)


@pytest.mark.parametrize(
    "config, world, local, message",
    [
        ({}, 4, None, "empty"),
        ({0: 4}, 4, None, "period 0"),
        ({-2: 4}, 4, None, "period -2"),
        ({4: 2, 2: 4}, 4, None, "strictly increase"),
        ({2: 2, 2.5: 4}, 4, None, "period 2.5"),
        ({2: 0, 4: 4}, 4, None, "group size 0"),
        ({2: "node", 4: 4}, 4, None, "'node'"),
        ({2: 4, 4: 2}, 4, None, "must not decrease"),
        ({2: 2, 4: 3, 8: 6}, 6, None, "does not divide 3"),
        ({2: 3, 4: 3}, 4, None, "does not divide the world size 4"),
        ({2: 2, 4: 2}, 4, None, "top level must span"),
        ({2: "local", 4: "world"}, 4, None, "LOCAL_WORLD_SIZE"),
        ({2: 4, 4: "world"}, 2, None, "must not decrease"),
    ],
)
def test_bad_configurations_name_the_value(config, world, local, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_levels(normalize_config(config), world, local)


def test_steps_follow_torch_semantics():
    periods = [2, 4, 8]
    fired = {step: level_for_step(step, 3, periods) for step in range(17)}
    assert [s for s, lv in fired.items() if lv is not None] == [4, 6, 8, 10, 12, 14, 16]
    assert fired[8] == 2 and fired[12] == 1 and fired[6] == 0
    # Absolute step, not step - warmup: step 3 is past warmup but no period divides it.
    assert fired[3] is None


def test_blocks_are_contiguous():
    assert contiguous_blocks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert block_of(5, 2) == [4, 5]


@st.composite
def nested_hierarchies(draw):
    world = draw(st.sampled_from([1, 2, 4, 6, 8, 12, 16]))
    sizes = [world]
    while draw(st.booleans()) and len(sizes) < 4:
        divisors = [d for d in range(1, sizes[0] + 1) if sizes[0] % d == 0]
        sizes.insert(0, draw(st.sampled_from(divisors)))
    periods = sorted(draw(st.sets(st.integers(1, 64), min_size=len(sizes), max_size=len(sizes))))
    return world, list(zip(periods, sizes))


@settings(max_examples=200, deadline=None)
@given(nested_hierarchies(), st.integers(0, 20), st.integers(0, 200))
def test_level_fired_is_largest_dividing_period(hierarchy, warmup, step):
    world, config = hierarchy
    levels = resolve_levels(normalize_config(dict(config)), world)
    periods = [lv.period for lv in levels]
    index = level_for_step(step, warmup, periods)
    dividing = [i for i, p in enumerate(periods) if step % p == 0]
    if step < warmup or not dividing:
        assert index is None
    else:
        assert index == max(dividing, key=lambda i: periods[i])


@settings(max_examples=200, deadline=None)
@given(nested_hierarchies(), st.data())
def test_groups_nest_and_partition_the_world(hierarchy, data):
    world, config = hierarchy
    levels = resolve_levels(normalize_config(dict(config)), world)
    rank = data.draw(st.integers(0, world - 1))
    for lower, upper in zip(levels, levels[1:]):
        assert set(block_of(rank, lower.group_size)) <= set(block_of(rank, upper.group_size))
    for level in levels:
        blocks = contiguous_blocks(world, level.group_size)
        assert sorted(r for b in blocks for r in b) == list(range(world))
        assert block_of(rank, level.group_size) in blocks
    assert levels[-1].group_size == world


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 40), st.integers(-2, 20)), min_size=1, max_size=4), st.integers(1, 16))
def test_any_config_either_resolves_to_a_valid_nesting_or_raises_valueerror(items, world):
    try:
        levels = resolve_levels(normalize_config(items), world)
    except ValueError as exc:
        assert str(exc)
        return
    assert levels[-1].group_size == world
    assert all(b.period > a.period and b.group_size % a.group_size == 0 for a, b in zip(levels, levels[1:]))
