"""An outer optimizer on the ``"replicas"`` top level, in real gloo processes.

Four processes form two replica groups of two: each pair has its own default
process group, as two torchrun jobs would. The top level here is a real
implementation of the averager's ``TopLevel`` protocol: an all_reduce over a
gloo group of all four ranks built outside torch.distributed's default group,
as torchft builds its own (optionally discarding chosen syncs on every rank), so the
averager's side of the anchored replicas level is checked without torchft's
timing; tests/test_ft_torchrun.py runs it through torchft with a lighthouse,
kills and heals.
"""

from __future__ import annotations

import functools

import pytest

from tests.distributed import run_workers

torch = pytest.importorskip("torch")

from elastic_hsgd import HierarchicalModelAverager  # noqa: E402

WORLD = 4
GROUP = 2
STEPS = 25
NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)


class AllRanksTopLevel:
    """Averages the buffers over every rank of every replica group."""

    def __init__(self, cross_group=None, discard_steps: frozenset[int] = frozenset()) -> None:
        self.cross_group = cross_group
        self.discard_steps = discard_steps
        self.calls: list[int] = []

    def average(self, flats, group, step) -> bool:
        self.calls.append(step)
        if step in self.discard_steps:
            return False
        for flat in flats:
            self.cross_group.allreduce([flat]).wait()
            flat.div_(self.cross_group.size())
        return True


def _split_into_replica_groups(rank: int, world_size: int, ports: tuple[int, int, int]):
    """Leave the 4-rank default group; join this pair's own, and a cross-group gloo group of all four."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.destroy_process_group()
    cross_port, *pair_ports = ports
    store = dist.TCPStore("127.0.0.1", cross_port, world_size, is_master=rank == 0, timeout=timedelta(seconds=60))
    cross = dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=60))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{pair_ports[rank // GROUP]}", rank=rank % GROUP, world_size=GROUP,
        timeout=timedelta(seconds=60),
    )
    return cross, store


def _ports() -> tuple[int, int, int]:
    from tests.distributed import free_port

    return free_port(), free_port(), free_port()


def _gather_all(cross, tensors: list) -> list[list]:
    """Every rank's copy of ``tensors``, over the cross-group group."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = [torch.empty_like(flat) for _ in range(cross.size())]
    cross.allgather([out], [flat]).wait()
    return out


def _local_step(params: list, rank: int, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def _replicas_vs_world_worker(rank: int, world_size: int, warmup: int, ports: tuple[int, int, int]) -> dict:
    import torch.distributed as dist

    # The same hierarchy without replica groups, over the 4-rank default group: its top
    # level is an ordinary world level. Run first, then the replica-group version.
    ref_model = _model()
    ref = HierarchicalModelAverager({2: GROUP, 4: "world"}, warmup_steps=warmup, outer_optimizers={4: NESTEROV})
    reference = []
    for step in range(STEPS):
        _local_step(list(ref_model.parameters()), rank, step)
        ref.average_parameters(ref_model.parameters())
        reference.append([p.detach().clone() for p in ref_model.parameters()])
    ref.release_groups()

    cross, _store = _split_into_replica_groups(rank, world_size, ports)
    assert dist.get_world_size() == GROUP
    model = _model()
    top = AllRanksTopLevel(cross)
    averager = HierarchicalModelAverager(
        {2: GROUP, 4: "replicas"}, warmup_steps=warmup, outer_optimizers={4: NESTEROV}, top_level=top,
    )
    gaps = []
    for step in range(STEPS):
        _local_step(list(model.parameters()), rank, step)
        averager.average_parameters(model.parameters())
        gaps.append(max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference[step])))
    everyone = _gather_all(cross, list(model.parameters()))
    anchors = _gather_all(cross, averager.state_dict()["outer"]["anchors"]["4"])
    momentum = _gather_all(cross, [s["momentum_buffer"] for s in averager.state_dict()["outer"]["optimizers"]["4"]["state"].values()])
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), _model().parameters()))
    return {
        "gaps": gaps, "moved": moved, "calls": top.calls,
        "params_agree": all(torch.equal(everyone[0], e) for e in everyone),
        "anchors_agree": all(torch.equal(anchors[0], a) for a in anchors),
        "momentum_agree": all(torch.equal(momentum[0], m) for m in momentum),
    }


@pytest.mark.parametrize("warmup", [0, 4])
def test_outer_nesterov_on_replicas_equals_the_same_step_on_a_world_level(warmup):
    """Across replica groups the outer step is the world level's: same anchors, momentum and result."""
    results = run_workers(_replicas_vs_world_worker, WORLD, warmup, _ports(), deadline_s=300)
    for r in results:
        # Anchors of an anchored replicas level start at the first committed top-level
        # sync at or after warmup, which is the first call at or after warmup when warmup
        # is a multiple of the top period (as here): the world level's pseudo-gradient at
        # that call is zero, so both end the call at the mean, with zero momentum.
        assert max(r["gaps"]) < 1e-5, r["gaps"]
        # Step 24 syncs: every rank of every group holds the same parameters, anchors and momentum.
        assert r["params_agree"] and r["anchors_agree"] and r["momentum_agree"], r
        assert r["moved"] > 1e-3  # and training moved them: the checks above are not vacuous
        # The averager steps before a top-level sync (a healing group adopts the step), so
        # the top level sees the step after the one that fired.
        assert r["calls"] == [s + 1 for s in range(STEPS) if s >= warmup and s % 4 == 0]


def _discard_worker(rank: int, world_size: int, ports: tuple[int, int, int]) -> dict:
    cross, _store = _split_into_replica_groups(rank, world_size, ports)
    model = _model()
    top = AllRanksTopLevel(cross, discard_steps=frozenset({9}))  # handed the step after the one firing (8)
    averager = HierarchicalModelAverager({2: GROUP, 4: "replicas"}, outer_optimizers={4: NESTEROV}, top_level=top)
    record = {}
    for step in range(13):
        _local_step(list(model.parameters()), rank, step)
        before = [p.detach().clone() for p in model.parameters()]
        anchors = [a.clone() for a in averager.state_dict()["outer"].get("anchors", {}).get("4", [])]
        averager.average_parameters(model.parameters())
        if step == 8:
            outer_state = averager.state_dict()["outer"]
            # A discarded sync changes nothing, and the group-level sync it replaced did not run either.
            record["params_kept"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            record["anchors_kept"] = bool(anchors) and all(torch.equal(a, b) for a, b in zip(anchors, outer_state["anchors"]["4"]))
    everyone = _gather_all(cross, list(model.parameters()))
    record["params_agree"] = all(torch.equal(everyone[0], e) for e in everyone)
    return record


def test_a_discarded_replicas_sync_keeps_parameters_and_anchors_and_the_next_one_catches_up():
    for r in run_workers(_discard_worker, WORLD, _ports(), deadline_s=300):
        assert r["params_kept"] and r["anchors_kept"], r
        assert r["params_agree"]  # step 12's sync carried the steps since 4 and brought every rank together


def test_comm_dtype_on_the_replicas_level_is_refused_before_any_collective():
    with pytest.raises(ValueError, match=r"comm_dtypes\[8\] is set on the 'replicas' level"):
        HierarchicalModelAverager(
            {2: 2, 8: "replicas"}, comm_dtypes={8: torch.bfloat16}, top_level=AllRanksTopLevel(),
        )
