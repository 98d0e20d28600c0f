"""Averager behaviour: validation, state_dict, rebuild at another world size."""

from __future__ import annotations

import json

import pytest

from tests.distributed import free_port, run_workers

torch = pytest.importorskip("torch")

from elastic_hsgd import HierarchicalModelAverager  # noqa: E402


@pytest.mark.parametrize(
    "config, warmup, message",
    [
        ({}, 0, "empty"),
        ({0: 1}, 0, "period 0"),
        ({4: 1, 2: 1}, 0, "strictly increase"),
        ({2: 2, 4: 1}, 0, "must not decrease"),
        ({2: 1, 4: 2}, 0, "does not divide the world size 1"),
        ({2: "galaxy"}, 0, "'galaxy'"),
        ({2: 1}, -1, "warmup_steps -1"),
    ],
)
def test_construction_rejects_bad_input(single_process_group, config, warmup, message):
    with pytest.raises(ValueError, match=message):
        HierarchicalModelAverager(config, warmup_steps=warmup)


def test_max_period_one_warns_like_torch(single_process_group):
    with pytest.warns(UserWarning, match="period") as record:
        HierarchicalModelAverager({1: "world"})
    assert "plain DDP" in str(record[0].message)


def test_state_dict_is_plain_json_and_round_trips(single_process_group):
    averager = HierarchicalModelAverager({2: 1, 4: "world"}, warmup_steps=3)
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    for _ in range(7):
        averager.average_parameters(model.parameters())
    state = json.loads(json.dumps(averager.state_dict()))
    assert state["step"] == 7 and state["world_size"] == 1 and state["levels"] == [[2, 1], [4, 1]]

    resumed = HierarchicalModelAverager({2: 1, 4: "world"}, warmup_steps=3)
    resumed.load_state_dict(state)
    assert resumed.step == 7

    with pytest.raises(ValueError, match="saved with hierarchy"):
        HierarchicalModelAverager({2: 1, 8: "world"}, warmup_steps=3).load_state_dict(state)
    with pytest.raises(ValueError, match="warmup_steps=3"):
        HierarchicalModelAverager({2: 1, 4: "world"}, warmup_steps=0).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"step": 1})


def test_average_keeps_dtypes_and_storage_after_first_call(single_process_group):
    averager = HierarchicalModelAverager({2: "world"})
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).double())
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    model[1].weight.grad = torch.zeros_like(model[1].weight)
    values = [p.detach().clone() for p in model.parameters()]
    averager.average_parameters(model.parameters())
    assert [p.dtype for p in model.parameters()] == [torch.float32, torch.float32, torch.float64, torch.float64]
    for before, p in zip(values, model.parameters()):
        assert torch.equal(before, p)
    pointers = [p.data_ptr() for p in model.parameters()]
    averager.average_parameters(model.parameters())
    averager.average_parameters(model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == pointers


def _mixed_and_tied_worker(rank: int, world_size: int) -> None:
    from elastic_hsgd import HierarchicalModelAverager

    shared = torch.nn.Linear(3, 3)
    model = torch.nn.ModuleDict({"a": shared, "b": shared, "wide": torch.nn.Linear(2, 2).double()})
    for p in model.parameters():
        p.data.fill_(float(rank))
        p.grad = torch.zeros_like(p)
    frozen = torch.nn.Parameter(torch.full((2,), float(rank)), requires_grad=False)  # frozen: left alone
    averager = HierarchicalModelAverager({2: 2, 4: "world"})
    averager.average_parameters(list(model.parameters()) + [frozen, shared.weight])  # tied weight listed twice
    assert torch.equal(model["wide"].weight, torch.full((2, 2), 1.5, dtype=torch.float64))
    assert torch.equal(shared.weight, torch.full((3, 3), 1.5))  # averaged once, not twice
    assert torch.equal(frozen, torch.full((2,), float(rank)))
    averager.average_parameters(model.parameters())  # step 1: no period divides it
    averager.average_parameters(model.parameters())  # step 2: groups of 2
    assert torch.equal(shared.bias, torch.full((3,), 1.5))
    # Parameters moved elsewhere (as .to() or a reassigning load would) are re-flattened.
    shared.bias.data = torch.full((3,), float(rank))
    averager.average_parameters(model.parameters())  # step 3: nothing
    averager.average_parameters(model.parameters())  # step 4: world
    assert torch.equal(shared.bias, torch.full((3,), 1.5))
    return [p.dtype for p in model.parameters()]


def test_mixed_dtypes_and_tied_parameters():
    dtypes = run_workers(_mixed_and_tied_worker, 4)
    assert dtypes == [[torch.float32, torch.float32, torch.float64, torch.float64]] * 4


def _rebuild_worker(rank: int, world_size: int, port: int) -> dict:
    from datetime import timedelta

    import torch.distributed as dist

    from elastic_hsgd import HierarchicalModelAverager

    averager = HierarchicalModelAverager({1: 2, 2: "world"}, warmup_steps=1)
    model = torch.nn.Linear(2, 1)
    for step in range(5):
        model.weight.data.fill_(float(rank))
        model.weight.grad = torch.zeros_like(model.weight)
        averager.average_parameters(model.parameters())
    saved = averager.state_dict()
    assert saved["levels"] == [[1, 2], [2, 4]]
    assert model.weight.flatten()[0].item() == 1.5  # step 4: whole world of 4

    # Ranks 2 and 3 leave; 0 and 1 re-form a world of 2 in this same process.
    dist.destroy_process_group()
    if rank >= 2:
        return {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    averager.rebuild()
    assert [(lv.period, lv.group_size) for lv in averager.levels] == [(1, 2), (2, 2)]
    fresh = HierarchicalModelAverager({1: 2, 2: "world"}, warmup_steps=1)
    fresh.load_state_dict(saved)  # saved at world 4, loaded at world 2
    assert fresh.step == 5
    model.weight.data.fill_(float(rank) * 10)
    fresh.average_parameters(model.parameters())  # step 5: groups of 2 == world of 2
    averaged = model.weight.flatten()[0].item()

    literal = HierarchicalModelAverager({1: 2, 2: 2}, warmup_steps=1)
    literal.load_state_dict({**saved, "config": [[1, 2], [2, 2]]})  # literal 2 fits the world of 2

    try:
        HierarchicalModelAverager({1: 4, 2: "world"})
    except ValueError as exc:
        error = str(exc)
    else:
        error = ""
    return {"averaged": averaged, "error": error}


def test_rebuild_after_reinit_at_a_different_world_size():
    results = run_workers(_rebuild_worker, 4, free_port())
    assert results[0]["averaged"] == results[1]["averaged"] == 5.0
    for rank in (0, 1):
        assert "does not fit world size 2" in results[rank]["error"]
        assert "group size 2 (period 2) is smaller than 4" in results[rank]["error"]
