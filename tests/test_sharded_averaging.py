"""Issue 21: the averager on DTensor parameters (FSDP2, HSDP), in real gloo processes on CPU.

Four ranks as 2 replicas x 2 shards. Each process trains an FSDP2 model and, beside it,
the same model unsharded on the same data (its replica's two batches at once, which is
what FSDP2's reduce-scatter of the two ranks' gradients amounts to), each with its own
averager of the same hierarchy. After every step each replica's ``full_tensor()`` must
equal the unsharded parameters: sharded averaging is the averaging of the model.
"""

from __future__ import annotations

import functools
import logging

import pytest

from tests.distributed import collect_package_warnings, run_workers

torch = pytest.importorskip("torch")

WORLD = 4
STEPS = 13
NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)

# (name, {period: size}, outer-optimizer periods, {period: wire dtype}, tolerance)
CASES = [
    ("plain", {2: 2, 4: "world"}, [], {}, 1e-5),
    ("outer nesterov", {3: "world"}, [3], {}, 1e-5),
    ("bf16 wire", {2: "world", 6: "world"}, [6], {2: torch.bfloat16}, 1e-3),
]


def _model():
    torch.manual_seed(0)
    # 13 rows over 2 shards are 7 + 6, 3 rows are 2 + 1: uneven everywhere.
    return torch.nn.Sequential(torch.nn.Linear(5, 13), torch.nn.LayerNorm(13), torch.nn.ReLU(), torch.nn.Linear(13, 3))


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for block in model:
        if list(block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _batches(replica: int, step: int) -> list:
    return [torch.randn(4, 5, generator=torch.Generator().manual_seed(1000 * replica + 10 * j + step)) for j in range(2)]


def _equivalence_worker(rank: int, world_size: int, hsdp: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from elastic_hsgd import HierarchicalModelAverager

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    replica, shard = divmod(rank, 2)
    out: dict = {}
    for name, config, outers, wires, _ in CASES:
        kwargs = dict(warmup_steps=2, outer_optimizers={p: NESTEROV for p in outers}, comm_dtypes=dict(wires))
        plain = _model()
        sharded = _shard(_model(), mesh if hsdp else mesh["shard"])
        averagers = [HierarchicalModelAverager(config, **kwargs) for _ in range(2)]
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, sharded)]
        worst, apart, pointers = 0.0, 0.0, []
        for step in range(STEPS):
            if hsdp:  # HSDP all-reduces gradients over the replicas too: the unsharded model sees every batch
                batch = torch.cat([b for r in range(2) for b in _batches(r, step)])
            else:
                batch = torch.cat(_batches(replica, step))
            plain(batch).pow(2).mean().backward()
            sharded(_batches(replica, step)[shard]).pow(2).mean().backward()
            for model, opt, averager in zip((plain, sharded), optimizers, averagers):
                opt.step()
                opt.zero_grad()
                averager.average_parameters(model.parameters())
            pointers.append(tuple(p.to_local().data_ptr() for p in sharded.parameters()))
            for a, b in zip(plain.parameters(), sharded.parameters()):
                worst = max(worst, (a.detach() - b.full_tensor().detach()).abs().max().item())
            # Replicas drift apart between syncs (so the averaging above was not a no-op by chance).
            full = sharded[0].weight.full_tensor().detach().clone()
            other = [torch.empty_like(full) for _ in range(world_size)]
            torch.distributed.all_gather(other, full)
            apart = max(apart, (other[0] - other[2]).abs().max().item())
        # synchronize: the world's plain mean, the same as the unsharded run's and on every replica.
        for model, averager in zip((plain, sharded), averagers):
            averager.synchronize(model.parameters())
        synced = torch.cat([b.full_tensor().detach().reshape(-1) for b in sharded.parameters()])
        gathered = [torch.empty_like(synced) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, synced)
        synchronized = max((a.detach() - b.full_tensor().detach()).abs().max().item() for a, b in zip(plain.parameters(), sharded.parameters()))
        buffers = averagers[1]._flat._shards._buffers
        local = sharded[0].weight.to_local()
        out[name] = {
            "worst": worst,
            "apart": apart,
            # Flattened once, at the first sync that averages, and never copied or moved again.
            "moved once": sum(a != b for a, b in zip(pointers, pointers[1:])) == 1,
            "in the flat buffer": any(b.untyped_storage().data_ptr() == local.untyped_storage().data_ptr() for b in buffers),
            "buffer elements": sum(b.numel() for b in buffers),
            "synchronized": synchronized,
            "replicas equal": all(torch.equal(g, gathered[0]) for g in gathered),
            "placements": [str(p.placements) for p in sharded.parameters()][:1],
        }
    return out


@pytest.mark.parametrize("hsdp", [False, True], ids=["fsdp2 1-D shard mesh", "hsdp 2-D mesh"])
def test_sharded_averaging_equals_the_unsharded_run_after_every_step(hsdp):
    results = run_workers(_equivalence_worker, WORLD, hsdp, deadline_s=300)
    for name, _, _, _, tolerance in CASES:
        for rank, result in enumerate(results):
            got = result[name]
            assert got["worst"] <= tolerance, (name, rank, got)
            assert got["moved once"] and got["in the flat buffer"], (name, rank, got)
            assert got["synchronized"] <= tolerance and got["replicas equal"], (name, rank, got)
            if not hsdp:
                assert got["apart"] > 1e-4, (name, rank, got)  # local steps differ between replicas
        # 1/shard of the model per rank: FSDP2's padded shards (13x5+13 -> 7 rows; 13+13 -> 7; 3x13+3 -> 2 rows).
        assert results[0][name]["buffer elements"] == 7 * 5 + 7 + 7 + 7 + 2 * 13 + 2
        assert results[1][name]["buffer elements"] == results[0][name]["buffer elements"]
    expected = "(Replicate(), Shard(dim=0))" if hsdp else "(Shard(dim=0),)"
    assert results[0]["plain"]["placements"] == [expected]


# -- refusals and warnings ---------------------------------------------------------


def _refusals_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from elastic_hsgd import HierarchicalModelAverager

    out: dict = {}

    def attempt(label, config, params, **kwargs):
        try:
            HierarchicalModelAverager(config, **kwargs).average_parameters(params)
            out[label] = None
        except (TypeError, ValueError) as exc:
            out[label] = (type(exc).__name__, str(exc))

    # Replicas are the columns of this mesh ({0, 2} and {1, 3}): blocks of 2 contiguous ranks split them.
    columns = init_device_mesh("cpu", (2, 2), mesh_dim_names=("shard", "replicate"))
    model = _shard(_model(), columns["shard"])
    attempt("misfit", {2: 2, 4: "world"}, model.parameters())

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Replicate(), Partial()]))
    attempt("partial", {2: "world"}, [partial])
    whole = init_device_mesh("cpu", (4,), mesh_dim_names=("all",))
    a = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Replicate(), Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), whole, [Shard(0)]))
    attempt("two meshes", {2: "world"}, [a, b])

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("elastic_hsgd").addHandler(handler)
    try:
        single = _shard(_model(), mesh["shard"])
        averager = HierarchicalModelAverager({2: 2, 4: "world"})
        opt = torch.optim.SGD(single.parameters(), lr=0.1)
        before = [p.full_tensor().clone() for p in single.parameters()]
        for step in range(3):  # steps 0 (fires period 4), 1, 2 (fires the single-replica level)
            if step == 1:
                single(torch.randn(2, 5, generator=torch.Generator().manual_seed(rank))).sum().backward()
                opt.step()
                opt.zero_grad()
                before = [p.full_tensor().clone() for p in single.parameters()]
            averager.average_parameters(single.parameters())
        out["single unchanged"] = all(torch.equal(x, p.full_tensor()) for x, p in zip(before, single.parameters()))
        averager.average_parameters(single.parameters())  # step 3: nothing fires
        averager.average_parameters(single.parameters())  # step 4: the world level
        averager2 = HierarchicalModelAverager({2: 2, 4: "world"})
        averager2.average_parameters(single.parameters())
    finally:
        logging.getLogger("elastic_hsgd").removeHandler(handler)
    out["warnings"] = [m for m in records if "single replica" in m]
    return out


def test_misfits_partial_and_mixed_meshes_are_refused_on_every_rank_and_single_replica_levels_warn_once():
    results = run_workers(_refusals_worker, WORLD, deadline_s=300)
    for result in results:
        kind, message = result["misfit"]
        assert kind == "ValueError"
        assert "level 0 (period 2, group size 2)" in message and "splits the replica" in message
        assert "mesh (shard=2, replicate=2)" in message and "init_device_mesh" in message
        kind, message = result["partial"]
        assert kind == "TypeError" and "parameter 0 (DTensor, shape [3]" in message and "Partial" in message
        kind, message = result["two meshes"]
        assert kind == "TypeError" and "parameter 1" in message and "the same device mesh" in message
        assert result["single unchanged"]
        # Once per averager and level: the second averager warns again, the first not twice.
        assert len(result["warnings"]) == 2 and "level 0 (period 2, group size 2)" in result["warnings"][0]


# -- state: bit-identical resume, the shard layout in it ---------------------------


def _state_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from elastic_hsgd import HierarchicalModelAverager

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    replica, shard = divmod(rank, 2)

    def train(model, opt, averager, start, stop):
        for step in range(start, stop):
            model(_batches(replica, step)[shard]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            averager.average_parameters(model.parameters())

    def build():
        model = _shard(_model(), mesh["shard"])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        averager = HierarchicalModelAverager({3: "world"}, warmup_steps=2, outer_optimizers={3: NESTEROV},
                                             comm_dtypes={3: torch.bfloat16})
        return model, opt, averager

    model, opt, averager = build()
    train(model, opt, averager, 0, 7)
    saved = {
        "model": {k: v.to_local().clone() for k, v in model.state_dict().items()},
        "averager": _clone(averager.state_dict()),
    }
    train(model, opt, averager, 7, STEPS)

    resumed, opt2, averager2 = build()
    with torch.no_grad():
        for p, local in zip(resumed.parameters(), saved["model"].values()):
            p.to_local().copy_(local)
    averager2.load_state_dict(saved["averager"])
    train(resumed, opt2, averager2, 7, STEPS)
    out = {
        "identical": all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), resumed.parameters())),
        "layout": saved["averager"]["shard_layout"],
        "anchor elements": [a.numel() for a in saved["averager"]["outer"]["anchors"]["3"]],
    }
    # A peer's state from a rank holding other slices (as a heal from a group sharded otherwise would bring).
    other = dict(saved["averager"], shard_layout="0123456789abcdef")
    try:
        averager2.load_state_dict(other)
    except ValueError as exc:
        out["refused"] = str(exc)
    return out


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def test_sharded_state_resumes_bit_identically_and_refuses_another_shard_layout():
    results = run_workers(_state_worker, WORLD, deadline_s=300)
    for result in results:
        assert result["identical"]
        assert "every replica group must shard the model the same way" in result["refused"]
    assert len({r["layout"] for r in results}) == 1  # how the model is sharded: the same on every rank
    assert results[0]["anchor elements"] == [7 * 5 + 7 + 7 + 7 + 2 * 13 + 2]  # this rank's shards only


def test_outer_state_of_sharded_parameters_resumes_only_at_the_same_layout_and_world(caplog):
    from elastic_hsgd.averager_state import keeps_outer_state
    from elastic_hsgd.levels.anchors import Agreement, AnchorState

    class Anchors:
        levels = ["a level"]
        state = AnchorState(Agreement.AGREED, pending={"started": True})

    for saved, world, kept in ((("ab", 4), 4, True), (("ab", 4), 6, False), (("cd", 4), 4, False), (None, 4, True)):
        anchors = Anchors()
        anchors.state = AnchorState(Agreement.AGREED, pending={"started": True})
        with caplog.at_level("WARNING"):
            keeps_outer_state(saved, "ab", world, anchors)
        assert (anchors.state.pending is not None) == kept, (saved, world)
        assert anchors.state.started == kept
    assert "another world size" in caplog.text and "another shard layout" in caplog.text


# -- pure: the slice groups of each level, and a heal's layout check ---------------


def test_slice_groups_of_each_level_follow_the_mesh():
    from elastic_hsgd.hierarchy import Level
    from elastic_hsgd.sharding import Mesh
    from elastic_hsgd.topology import plan_slices

    fsdp = [("Replicate()", "Shard(0)")]
    mesh = Mesh.from_ranks([[0, 1], [2, 3], [4, 5], [6, 7]], ("replicate", "shard"))
    plan = plan_slices(mesh, fsdp, [Level(1, 2), Level(2, 4), Level(4, 8)], list(range(8)))
    assert plan.single == (1,) and plan.position == (0, 1) * 4
    assert dict(plan.groups)[2] == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert dict(plan.groups)[4] == ((0, 2, 4, 6), (1, 3, 5, 7))
    # The averager's group as global ranks 10..17: the plan is in its group ranks.
    shifted = Mesh(mesh.shape, tuple(r + 10 for r in mesh.ranks), mesh.dims)
    assert plan_slices(shifted, fsdp, [Level(4, 8)], list(range(10, 18))).groups == ((4, dict(plan.groups)[4]),)
    # A "replicas" top level over one replica per group is no no-op: each rank is its own slice group.
    one = Mesh.from_ranks([[0, 1]], ("replicate", "shard"))
    across = plan_slices(one, fsdp, [Level(8, 2)], [0, 1], across_groups=8)
    assert across.single == () and across.groups == ((8, ((0,), (1,))),)
    with pytest.raises(ValueError, match=r"level 0 \(period 1, group size 1\).*splits the replica"):
        plan_slices(mesh, fsdp, [Level(1, 1), Level(4, 8)], list(range(8)))
    with pytest.raises(ValueError, match=r"ranks \[6, 7\] are not in the averager's process group"):
        plan_slices(mesh, fsdp, [Level(4, 6)], list(range(6)))


def test_a_heal_from_a_group_sharded_otherwise_is_refused_before_loading():
    from elastic_hsgd.averager_state import other_layout_in

    class Live:
        def __init__(self, layout):
            self.layout = layout

        def state_dict(self):
            return {"step": 4} if self.layout is None else {"step": 4, "shard_layout": self.layout}

    live = {"model": object(), "averager": Live("ab12")}
    assert other_layout_in(live, {"model": {}, "averager": {"shard_layout": "ab12"}}) is None
    assert other_layout_in({"averager": Live(None)}, {"averager": {"shard_layout": "ab12"}}) is None  # not sharded here
    message = other_layout_in(live, {"model": {}, "averager": {"step": 4, "shard_layout": "cd34"}})
    assert "shards the model otherwise (shard layout cd34, here ab12)" in message and "--shard-size" in message


# -- through CheckpointManager: exact resume keeps the outer state, another layout drops it --------


def _checkpoint_worker(rank: int, world_size: int, url: str, shape: tuple, steps: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from elastic_hsgd import CheckpointManager, HierarchicalModelAverager

    records = collect_package_warnings()  # the WARNING that drops the outer state
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    model = _shard(_model(), mesh["shard"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    averager = HierarchicalModelAverager({4: "world"}, warmup_steps=2, outer_optimizers={4: NESTEROV})
    state = {"model": model, "optimizer": opt, "averager": averager}
    manager = CheckpointManager(url, keep=3)
    start = manager.load_latest(state) or 0
    for step in range(start, steps):
        model(torch.randn(4, 5, generator=torch.Generator().manual_seed(100 * rank + step))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        averager.average_parameters(model.parameters())
    manager.save(steps, state)
    manager.close()
    return {"start": start, "step": averager.step, "dropped": any("dropped" in m for m in records), "agreed": averager._anchors.state.started}


def test_outer_state_resumes_through_the_checkpoint_manager_exactly_or_restarts_at_another_layout(tmp_path):
    url = str(tmp_path / "ckpt")
    first = run_workers(_checkpoint_worker, WORLD, url, (2, 2), 9, deadline_s=300)
    same = run_workers(_checkpoint_worker, WORLD, url, (2, 2), 13, deadline_s=300)
    resharded = run_workers(_checkpoint_worker, WORLD, url, (4, 1), 17, deadline_s=300)
    assert all(r["start"] == 0 and r["step"] == 9 for r in first)
    assert all(r["start"] == 9 and r["step"] == 13 and not r["dropped"] and r["agreed"] for r in same)
    assert all(r["start"] == 13 and r["step"] == 17 and r["dropped"] and r["agreed"] for r in resharded)


# -- tensor parallel placements: Shard(1) and Replicate() side by side ----------------


def _tensor_parallel_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from elastic_hsgd import HierarchicalModelAverager

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "tp"))
    replica, _ = divmod(rank, 2)
    torch.manual_seed(0)
    whole = [torch.randn(4, 5), torch.randn(3)]  # columns 3 + 2 over the tp dim; a replicated bias
    placements = [[Replicate(), Shard(1)], [Replicate(), Replicate()]]
    params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, p)) for t, p in zip(whole, placements)]
    noise = [torch.randn(t.shape, generator=torch.Generator().manual_seed(replica)) for t in whole]
    with torch.no_grad():
        for p, n, where in zip(params, noise, placements):
            local = p.to_local()
            local.add_(torch.chunk(n, 2, dim=1)[rank % 2] if isinstance(where[1], Shard) else n)
    averager = HierarchicalModelAverager({1: "world"})
    averager.average_parameters(params)
    expected = [t + (torch.randn(t.shape, generator=torch.Generator().manual_seed(0)) + torch.randn(t.shape, generator=torch.Generator().manual_seed(1))) / 2 for t in whole]
    return max((p.full_tensor() - e).abs().max().item() for p, e in zip(params, expected))


def test_tensor_parallel_placements_average_slice_by_slice():
    assert max(run_workers(_tensor_parallel_worker, WORLD, deadline_s=300)) <= 1e-6


# -- outer state at another number of replicas: the mean of the saved replicas, slice by slice ------------


def _outer_tensors(averager) -> list:
    """The anchors and outer momentum (live references), in a fixed order."""
    outer = averager.state_dict()["outer"]
    anchors = [a for period in sorted(outer["anchors"]) for a in outer["anchors"][period]]
    momenta = [s["momentum_buffer"] for period in sorted(outer["optimizers"]) for _, s in sorted(outer["optimizers"][period]["state"].items())]
    return anchors + momenta


def _replicas_worker(rank: int, world_size: int, url: str, shape: tuple, steps: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from elastic_hsgd import CheckpointManager, HierarchicalModelAverager

    records = collect_package_warnings()  # the WARNING that drops the outer state
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    model = _shard(_model(), mesh["shard"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    averager = HierarchicalModelAverager({4: "world"}, warmup_steps=2, outer_optimizers={4: NESTEROV})
    state = {"model": model, "optimizer": opt, "averager": averager}
    manager = CheckpointManager(url, keep=3)
    start = manager.load_latest(state) or 0
    loaded = None
    for step in range(start, steps):
        model(torch.randn(4, 5, generator=torch.Generator().manual_seed(100 * rank + step))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        averager.average_parameters(model.parameters())
        if loaded is None and start:  # the first call applied the loaded outer state (a level of one replica leaves it)
            loaded = [t.tolist() for t in _outer_tensors(averager)]
    if not start:
        # The two replicas' outer state as if they had drifted apart (their level agrees it at every outer step).
        with torch.no_grad():
            for t in _outer_tensors(averager):
                t.add_(0.25 * (rank // 2 + 1))
    saved = [t.tolist() for t in _outer_tensors(averager)]
    manager.save(steps, state)
    manager.close()
    return {"start": start, "step": averager.step, "dropped": any("dropped" in m for m in records), "saved": saved, "loaded": loaded}


def test_outer_state_at_fewer_replicas_is_the_mean_of_the_saved_replicas_of_each_slice(tmp_path):
    url = str(tmp_path / "ckpt")
    first = run_workers(_replicas_worker, WORLD, url, (2, 2), 9, deadline_s=300)
    fewer = run_workers(_replicas_worker, 2, url, (1, 2), 13, deadline_s=300)
    assert all(r["start"] == 9 and r["step"] == 13 and not r["dropped"] for r in fewer), fewer
    for rank, result in enumerate(fewer):
        # Rank r holds the slices saved ranks r and r + 2 held (2 x 2 -> 1 x 2): their mean, buffer by buffer.
        saved = [first[rank]["saved"], first[rank + 2]["saved"]]
        for got, a, b in zip(result["loaded"], *saved):
            expected = (torch.tensor(a, dtype=torch.float64) + torch.tensor(b, dtype=torch.float64)) / 2
            assert torch.allclose(torch.tensor(got, dtype=torch.float64), expected, atol=1e-6)
            assert not torch.allclose(torch.tensor(a), torch.tensor(b))  # the replicas did differ
    assert len(first[0]["saved"][0]) == len(first[1]["saved"][0])  # every rank's buffers padded alike


# -- rebuild() with sharded parameters: slice groups made again, anchors agreed again ---------------


def _rebuild_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from elastic_hsgd import HierarchicalModelAverager
    from elastic_hsgd.levels.anchors import Agreement

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _shard(_model(), mesh["shard"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    averager = HierarchicalModelAverager({2: "world"}, outer_optimizers={2: NESTEROV})

    def train(step: int) -> None:
        model(torch.randn(4, 5, generator=torch.Generator().manual_seed(100 * rank + step))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        averager.average_parameters(model.parameters())

    for step in range(3):  # period 2 fires at steps 0 and 2
        train(step)
    group_before = averager._slices.group(2)
    with torch.no_grad():  # as if the membership changed under ranks holding other anchors and momentum
        for t in _outer_tensors(averager):
            t.add_(0.5 * (rank // 2))
    perturbed = [t.tolist() for t in _outer_tensors(averager)]
    averager.rebuild()
    stale = averager._anchors.state.agreement is Agreement.STALE
    train(3)  # a step that does not fire: the call re-makes the slice groups and re-agrees first
    out = {
        "stale": stale, "agreed": averager._anchors.state.agreement is Agreement.AGREED,
        "new group": averager._slices.group(2) is not group_before, "perturbed": perturbed,
        "agreed state": [t.tolist() for t in _outer_tensors(averager)],
    }
    train(4)  # fires: each replica's full parameters the same again
    out["full"] = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]).tolist()
    return out


def test_rebuild_with_sharded_parameters_makes_the_slice_groups_again_and_re_agrees_the_anchors():
    results = run_workers(_rebuild_worker, WORLD, deadline_s=300)
    assert all(r["stale"] and r["agreed"] and r["new group"] for r in results)
    for rank in (0, 1):  # ranks r and r + 2 hold the same slices in the two replicas
        same = [results[rank], results[rank + 2]]
        for got0, got1, a, b in zip(same[0]["agreed state"], same[1]["agreed state"], same[0]["perturbed"], same[1]["perturbed"]):
            expected = (torch.tensor(a, dtype=torch.float64) + torch.tensor(b, dtype=torch.float64)) / 2
            assert torch.allclose(torch.tensor(got0, dtype=torch.float64), expected, atol=1e-6)
            assert torch.equal(torch.tensor(got0), torch.tensor(got1))
    assert torch.allclose(torch.tensor(results[0]["full"]), torch.tensor(results[2]["full"]), atol=1e-6)
