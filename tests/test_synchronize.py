"""``averager.synchronize(params)`` (issue 20, item 7): every rank ends with the mean of the parameters
over the whole world (across replica groups with a top level), a plain mean, anchors set to it, the
step unchanged; and the example jobs call it before their final save."""

from __future__ import annotations

import functools
import sys
from types import SimpleNamespace

import pytest

from tests.distributed import run_workers
from tests.test_outer_replicas import AllRanksTopLevel, _gather_all, _ports, _split_into_replica_groups

torch = pytest.importorskip("torch")

from elastic_hsgd import HierarchicalModelAverager  # noqa: E402

NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)


def _model() -> list:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]


def _local_steps(params: list, averager, rank: int, start: int, stop: int) -> None:
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(1000 * rank + step)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05)
        averager.average_parameters(params)


def _everyone(tensors: list, world_size: int) -> list:
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    out = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(out, flat)
    return out


def _synchronize_worker(rank: int, world_size: int) -> dict:
    out = {}
    for name, options in (
        ("plain", {}),
        ("anchored", {"outer_optimizers": {2: NESTEROV, 8: NESTEROV}, "comm_dtypes": {8: torch.bfloat16}}),
    ):
        params = _model()
        averager = HierarchicalModelAverager({2: 2, 8: "world"}, **options)
        _local_steps(params, averager, rank, 0, 7)  # steps 2, 4, 6: pairs only; replicas differ
        before = _everyone(params, world_size)
        assert averager.synchronize(params) is True
        after = _everyone(params, world_size)
        outer = averager.state_dict().get("outer")
        anchors_are_params = outer is None or all(
            torch.equal(a, b) for period in ("2", "8") for a, b in zip(outer["anchors"][period], averager._flat._buffers)
        )
        out[name] = {
            "differed": any(not torch.equal(b, before[0]) for b in before),
            "agree": all(torch.equal(a, after[0]) for a in after),
            "mean_error": (after[0] - torch.stack(before).mean(0)).abs().max().item(),
            "step": averager.step,
            "anchors_are_params": anchors_are_params,
        }
        _local_steps(params, averager, rank, 7, 9)  # and training goes on: step 8 syncs the world
        out[name]["agree_at_8"] = all(torch.equal(a, _everyone(params, world_size)[0]) for a in _everyone(params, world_size))
    return out


def test_synchronize_leaves_every_rank_with_the_world_mean_and_keeps_the_step():
    for result in run_workers(_synchronize_worker, 4, deadline_s=180):
        for name, r in result.items():
            assert r["differed"] and r["agree"], (name, r)
            assert r["mean_error"] < 1e-6, (name, r)  # a plain mean, not an outer step
            assert r["step"] == 7 and r["anchors_are_params"], (name, r)
            assert r["agree_at_8"], (name, r)


def _replicas_worker(rank: int, world_size: int, ports: tuple[int, int, int]) -> dict:
    cross, _store = _split_into_replica_groups(rank, world_size, ports)
    params = _model()
    top = AllRanksTopLevel(cross)
    averager = HierarchicalModelAverager({2: 2, 8: "replicas"}, outer_optimizers={8: NESTEROV}, top_level=top)
    _local_steps(params, averager, rank, 0, 11)  # step 8 synced across groups; 10 in the group only
    before = _gather_all(cross, params)
    committed = averager.synchronize(params)
    after = _gather_all(cross, params)
    anchors = averager.state_dict()["outer"]["anchors"]["8"]
    return {
        "committed": committed,
        "differed": any(not torch.equal(b, before[0]) for b in before),
        "agree": all(torch.equal(a, after[0]) for a in after),
        "mean_error": (after[0] - torch.stack(before).mean(0)).abs().max().item(),
        "anchors_are_params": all(torch.equal(a, b) for a, b in zip(anchors, averager._flat._buffers)),
        "step": averager.step,
    }


def test_synchronize_with_a_top_level_averages_across_replica_groups():
    for r in run_workers(_replicas_worker, 4, _ports(), deadline_s=180):
        assert r["committed"] and r["differed"] and r["agree"], r
        assert r["mean_error"] < 1e-6 and r["anchors_are_params"] and r["step"] == 11, r


# -- the examples end with synchronize, before their final save --------------------------------


class _Manager:
    """What train_loop asks of a CheckpointManager; records the parameters at the final save."""

    local_committed_step = None

    def __init__(self, params: list) -> None:
        self.params = params
        self.final: list | None = None

    def maybe_save(self, step: int, state: dict, final: bool = False) -> list:
        if final:
            self.final = [p.detach().clone() for p in self.params]
        return []


def _example_loop_worker(rank: int, world_size: int) -> dict:
    from tests.torchrun_job import EXAMPLES

    sys.path.insert(0, str(EXAMPLES))
    import common

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    averager = HierarchicalModelAverager({8: "world"}, warmup_steps=2)
    manager = _Manager(list(model.parameters()))
    generator = torch.Generator().manual_seed(rank)

    def train_step(step: int) -> "torch.Tensor":
        loss = model(torch.randn(3, 4, generator=generator)).square().mean()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
                p.grad = None
        return loss

    args = SimpleNamespace(steps=13, log_every=100, step_delay=0)  # the last step, 12, is no world sync
    info = SimpleNamespace(rank=rank, world_size=world_size)
    state = {"model": model, "averager": averager}
    common.train_loop(args, info, state, manager, 0, None, train_step, lambda: {})
    saved, now = _everyone(manager.final, world_size), _everyone(list(model.parameters()), world_size)
    return {"saved_agree": all(torch.equal(t, saved[0]) for t in saved), "now_agree": all(torch.equal(t, now[0]) for t in now)}


def test_the_example_loop_synchronizes_before_its_final_save():
    for r in run_workers(_example_loop_worker, 2, deadline_s=120):
        assert r == {"saved_agree": True, "now_agree": True}
