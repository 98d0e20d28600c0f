"""The example jobs' defaults and data order, without torchrun: the default hierarchy fits one machine
without a warning, and the LM job's window sampler resumes at the same global position at any world size."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch

from elastic_hsgd import HierarchicalModelAverager
from elastic_hsgd.data import epoch_order
from elastic_hsgd.hierarchy import normalize_config, repeated_group_sizes, resolve_levels
from tests.distributed import run_workers
from tests.torchrun_job import EXAMPLES

sys.path.insert(0, str(EXAMPLES))
import common  # noqa: E402
import train_digits  # noqa: E402
import train_lm  # noqa: E402

EXAMPLE_MODULES = [train_digits, train_lm]


@pytest.mark.parametrize("example", EXAMPLE_MODULES, ids=lambda m: m.__name__)
def test_default_hierarchy_resolves_on_one_machine_without_repeated_levels(example):
    config = normalize_config(common.parse_hierarchy(example.parse_args([]).hierarchy))
    for world in range(1, 9):  # one node: LOCAL_WORLD_SIZE == WORLD_SIZE, at every size an elastic job may reach
        assert repeated_group_sizes(resolve_levels(config, world, local_world_size=world)) == [], world
    # What the old default did on one node: both levels the same group (the averager warns).
    assert repeated_group_sizes(resolve_levels(normalize_config(common.parse_hierarchy("2:local,8:world")), 4, 4))


def _averager_warnings(args) -> list[str]:
    """Build the digits job's averager from ``args`` as its main() does; every warning or WARNING record."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = Collect()
    package = logging.getLogger("elastic_hsgd")
    package.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warnings.warn fails the build
            hierarchy = common.parse_hierarchy(args.hierarchy)
            averager = HierarchicalModelAverager(
                hierarchy, warmup_steps=args.warmup_steps, **common.averager_options(args, list(hierarchy))
            )
            averager.release_groups()
    finally:
        package.removeHandler(handler)
    return records


def test_default_averager_builds_without_a_warning_in_one_process(single_process_group, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _averager_warnings(train_digits.parse_args([])) == []


def _one_node_worker(rank: int, world_size: int, argv: list[str]) -> list[str]:
    return _averager_warnings(train_digits.parse_args(argv))


def test_default_averager_builds_without_a_warning_on_one_node_of_two():
    env = {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}
    assert run_workers(_one_node_worker, 2, [], env=env) == [[], []]
    # The check sees the warning the old default gave on one node (on rank 0, which logs it).
    old = run_workers(_one_node_worker, 2, ["--hierarchy", "2:local,8:world"], env=env)
    assert "both resolve to groups of 2" in " ".join(old[0])


def _lm_starts(samplers, steps: int) -> list[int]:
    """``steps`` steps of the LM job's batches, every rank in lockstep; the window starts drawn."""
    streams = [train_lm.endless(s) for s in samplers]
    return [start for _ in range(steps) for stream in streams for start in next(stream)]


def test_lm_window_sampler_resumes_4_to_2_to_4_at_the_same_global_position():
    data = torch.arange(2_000, dtype=torch.int64) % 256
    context, batch, seed = 16, 3, 5

    def world(size: int, saved: dict | None):
        samplers = [train_lm.window_sampler(data, context, batch, seed, rank, size) for rank in range(size)]
        for sampler in samplers if saved is not None else ():
            sampler.load_state_dict(saved)
        return samplers

    four = world(4, None)
    seen = _lm_starts(four, 7)
    two = world(2, four[0].state_dict())
    seen += _lm_starts(two, 11)
    four_again = world(4, two[1].state_dict())
    seen += _lm_starts(four_again, 5)
    assert len({tuple(s.state_dict().items()) for s in four_again}) == 1  # equal on every rank
    # Exactly the epoch's order so far: no window replayed, none skipped.
    assert seen == epoch_order(len(data) - context, 0, seed, True)[: len(seen)].tolist()
    inputs, targets = train_lm.lm_windows(data, torch.tensor(seen[:batch]), context)
    assert inputs.shape == (batch, context) and torch.equal(inputs[:, 1:], targets[:, :-1])
