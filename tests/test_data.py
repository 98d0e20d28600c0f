"""ElasticSampler: one global order, a position that resumes at any world size (ranks simulated, no processes)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from elastic_hsgd.data import ElasticSampler, GlobalBatches, epoch_order


def _world(world_size: int, state: dict | None = None, **kwargs) -> list[ElasticSampler]:
    samplers = [ElasticSampler(rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    if state is not None:
        for sampler in samplers:
            sampler.load_state_dict(state)
    return samplers


def _steps(samplers: list[ElasticSampler], iterators: list, count: int) -> list[int]:
    """``count`` lockstep steps of every rank; the indices they took, and every rank's state afterwards equal."""
    seen = []
    for _ in range(count):
        for it in iterators:
            seen.extend(next(it))
        states = [s.state_dict() for s in samplers]
        assert all(state == states[0] for state in states)
    return seen


def test_every_sample_once_per_epoch_across_4_2_4_ranks():
    kwargs = dict(num_samples=203, batch_size=5, seed=7)
    four = _world(4, **kwargs)
    seen = _steps(four, [iter(s) for s in four], 3)  # 60 samples
    state = four[0].state_dict()
    assert state == {"epoch": 0, "position": 60}

    two = _world(2, state, **kwargs)
    assert [len(s) for s in two] == [15, 15]  # 143 left: 14 global batches of 10, then 3 split 2/1
    seen += _steps(two, [iter(s) for s in two], 7)  # 70 more
    state = two[1].state_dict()
    assert state == {"epoch": 0, "position": 130}

    four = _world(4, state, **kwargs)
    lengths = [len(s) for s in four]
    assert lengths == [4, 4, 4, 4]  # 73 left: 3 of 20, then 13 split 4/3/3/3
    iterators = [iter(s) for s in four]
    tail = _steps(four, iterators, 4)
    assert sorted(seen + tail) == list(range(203)) and len(set(seen + tail)) == 203
    assert four[0].state_dict() == {"epoch": 1, "position": 0}  # rolled over after the last batch
    assert all(next(it, None) is None for it in iterators)

    # The order is the seeded permutation, not 0..n-1, and the next epoch draws a new one.
    assert seen[:5] == epoch_order(203, 0, 7, True)[:5].tolist() != list(range(5))
    epoch1 = _steps(four, [iter(s) for s in four], 1)
    assert epoch1 == epoch_order(203, 1, 7, True)[:20].tolist()


def test_tail_split_evenly_fewer_than_ranks_dropped_or_drop_last():
    plan = GlobalBatches(num_samples=23, batch_size=5, world_size=4)
    assert plan.take(20) == 0  # 3 left for 4 ranks
    plan = GlobalBatches(num_samples=27, batch_size=5, world_size=4)
    assert [plan.rank_span(20, r) for r in range(4)] == [(20, 22), (22, 24), (24, 26), (26, 27)]
    assert plan.batches_left(0) == 2 and plan.after(0, 20) == (1, 0)
    assert GlobalBatches(27, 5, 4, drop_last=True).batches_left(0) == 1
    # 3 samples left for 4 ranks: dropped (no rank takes an empty batch); the epoch ends at 20.
    samplers = _world(4, num_samples=23, batch_size=5, shuffle=False)
    assert [list(s) for s in samplers] == [[list(range(r * 5, r * 5 + 5))] for r in range(4)]
    assert samplers[0].state_dict() == {"epoch": 1, "position": 0}


def test_shuffle_false_is_the_identity_and_dataloader_takes_it_as_batch_sampler():
    dataset = TensorDataset(torch.arange(10))
    sampler = ElasticSampler(10, batch_size=2, shuffle=False, rank=1, world_size=2)
    loader = DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == 3
    assert [batch[0].tolist() for batch in loader] == [[2, 3], [6, 7], [9]]
    assert sampler.state_dict() == {"epoch": 1, "position": 0}
    assert len(loader) == 3  # the new epoch


def test_position_counts_batches_the_loop_received_even_with_prefetching_workers():
    dataset = TensorDataset(torch.arange(64))
    sampler = ElasticSampler(64, batch_size=4, shuffle=False, rank=0, world_size=1)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    got = []
    for step, (x,) in enumerate(sampler.track(loader)):
        got.append(x.tolist())
        if step == 2:
            break  # the workers had pulled batches ahead; only 3 reached the loop
    assert sampler.state_dict() == {"epoch": 0, "position": 12}
    resumed = ElasticSampler(64, batch_size=4, shuffle=False, rank=0, world_size=1)
    resumed.load_state_dict(sampler.state_dict())
    rest = [x.tolist() for (x,) in resumed.track(DataLoader(dataset, batch_sampler=resumed, num_workers=2))]
    assert sum(got + rest, []) == list(range(64))  # no replay, no skip
    assert resumed.state_dict() == {"epoch": 1, "position": 0}

    with pytest.raises(ValueError, match="does not draw from this sampler"):
        sampler.track(DataLoader(dataset, batch_size=4))


def test_set_epoch_keeps_a_loaded_position_and_warns_going_back(caplog):
    sampler = ElasticSampler(40, batch_size=2, rank=0, world_size=2)
    sampler.load_state_dict({"epoch": 3, "position": 8})
    sampler.set_epoch(3)
    assert sampler.state_dict() == {"epoch": 3, "position": 8} and len(sampler) == 8
    sampler.set_epoch(4)
    assert sampler.state_dict() == {"epoch": 4, "position": 0}
    with caplog.at_level(logging.WARNING, logger="elastic_hsgd.data"):
        sampler.set_epoch(0)
    assert "goes back from epoch 4" in caplog.text


def test_a_loaded_position_with_no_batch_left_at_the_new_world_rolls_over():
    sampler = ElasticSampler(23, batch_size=5, rank=0, world_size=4)
    sampler.load_state_dict({"epoch": 0, "position": 21})  # 2 left (saved at world 2): too few for 4 ranks
    assert sampler.state_dict() == {"epoch": 1, "position": 0}


def test_bad_arguments_are_value_errors_naming_the_value(monkeypatch):
    for kwargs, message in [
        (dict(num_samples=0, batch_size=1), "num_samples=0"),
        (dict(num_samples=10, batch_size=-2), "batch_size=-2"),
        (dict(num_samples=10, batch_size=True), "batch_size=True"),
        (dict(num_samples=10.0, batch_size=2), "num_samples=10.0"),
        (dict(num_samples=10, batch_size=2, seed=-1), "seed=-1"),
        (dict(num_samples=10, batch_size=2, rank=4, world_size=4), r"rank=4 is not in \[0, world_size=4\)"),
        (dict(num_samples=10, batch_size=2, rank=0, world_size=0), "world_size=0"),
        (dict(num_samples=3, batch_size=2, rank=0, world_size=4), "num_samples=3 gives no batch"),
        (dict(num_samples=7, batch_size=2, drop_last=True, rank=0, world_size=4), "at least 8 samples with drop_last"),
    ]:
        with pytest.raises(ValueError, match=message):
            ElasticSampler(**kwargs)

    sampler = ElasticSampler(10, 2, rank=0, world_size=1)
    for state, message in [
        ({"epoch": 0}, r"expected keys \['epoch', 'position'\], got \['epoch'\]"),
        ({"epoch": 0, "position": 11}, "position=11 is past the end of an epoch of num_samples=10"),
        ({"epoch": -1, "position": 0}, "epoch=-1"),
        ([0, 1], "got list"),
    ]:
        with pytest.raises(ValueError, match=message):
            sampler.load_state_dict(state)
    with pytest.raises(ValueError, match="epoch='1'"):
        sampler.set_epoch("1")

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torch.distributed is not initialized and RANK/WORLD_SIZE are not set"):
        ElasticSampler(10, 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ValueError, match="WORLD_SIZE='x' is not an int"):
        ElasticSampler(10, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (ElasticSampler(10, 2).rank, ElasticSampler(10, 2).world_size) == (1, 2)


def test_rank_and_world_size_default_from_torch_distributed(single_process_group, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")  # the initialized process group wins
    sampler = ElasticSampler(10, 2)
    assert (sampler.rank, sampler.world_size) == (0, 1)


def test_the_sampler_is_a_checkpoint_entry_resumed_at_another_world_size(tmp_path):
    from elastic_hsgd import CheckpointManager

    sampler = ElasticSampler(50, batch_size=4, seed=3, rank=0, world_size=1)
    seen = [i for _, batch in zip(range(5), sampler) for i in batch]
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(5, {"data": sampler})
    two = _world(2, num_samples=50, batch_size=4, seed=3)
    for s in two:
        manager.load(5, {"data": s})
    manager.close()
    assert two[1].state_dict() == {"epoch": 0, "position": 20}
    seen += _steps(two, [iter(s) for s in two], len(two[0]))
    assert sorted(seen) == list(range(50))
