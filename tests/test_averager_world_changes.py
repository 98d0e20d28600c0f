"""What a resume or a rebuild hands the anchored levels (issue 19, items 10-12), in real gloo processes:
outer optimizers with tensor state after a world change, the same world in another node shape, and a
parameter layout that differs on one rank."""

from __future__ import annotations

import functools

import pytest

from tests.distributed import clone_tree, free_port, run_workers

torch = pytest.importorskip("torch")

from elastic_hsgd import HierarchicalModelAverager  # noqa: E402

TENSOR_STATE_OPTIMIZERS = {
    "AdamW": functools.partial(torch.optim.AdamW, lr=0.01),
    "Adam": functools.partial(torch.optim.Adam, lr=0.01),
    "NAdam": functools.partial(torch.optim.NAdam, lr=0.01),
    "RAdam": functools.partial(torch.optim.RAdam, lr=0.01),
    "Adagrad": functools.partial(torch.optim.Adagrad, lr=0.1),
}


def _params(rank: int) -> list:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * rank)
    for p in params:
        p.grad = torch.zeros_like(p)  # so that the averager of before item 20.1 (gradients only) sees them too
    return params


def _run(params: list, averager, rank: int, start: int, stop: int) -> None:
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(1000 * rank + step)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        averager.average_parameters(params)


def _all_equal(tensors: list) -> bool:
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(o, flat) for o in out)


def _optimizer_state(averager) -> list:
    state = averager.state_dict()["outer"]["optimizers"]
    return [(period, name, v) for period, opt in sorted(state.items()) for s in opt["state"].values() for name, v in sorted(s.items())]


# -- item 10: outer optimizers with tensor state after a world change ----------------------------


def _tensor_state_worker(rank: int, world_size: int, port: int) -> dict:
    from datetime import timedelta

    import torch.distributed as dist

    config = {1: 1, 2: "world"}  # groups of one below: its Adam moments differ between ranks
    runs = {}
    for name, factory in TENSOR_STATE_OPTIMIZERS.items():
        params = _params(rank)
        averager = HierarchicalModelAverager(config, outer_optimizers={1: factory, 2: factory})
        _run(params, averager, rank, 0, 5)
        runs[name] = (params, averager, clone_tree(averager.state_dict()), [p.detach().clone() for p in params])
    dist.destroy_process_group()
    if rank >= 2:
        return {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    out = {}
    for name, factory in TENSOR_STATE_OPTIMIZERS.items():
        params, averager, saved, saved_params = runs[name]
        # 0-d state (step counts, NAdam's mu_product) is taken as is: level 1 steps once more at step 5.
        steps_before = [(p, n, v.item()) for p, n, v in _optimizer_state(averager) if v.dim() == 0 and (p == "2" or n == "step")]
        averager.rebuild()
        averager._start_anchors(params)  # what the next call does first after a rebuild: re-agree
        floats = [v.clone() for _, _, v in _optimizer_state(averager) if v.is_floating_point() and v.dim() > 0]
        averager.average_parameters(params)  # step 5: level 1 fires
        steps_after = [(p, n, v.item()) for p, n, v in _optimizer_state(averager) if v.dim() == 0 and (p == "2" or n == "step")]
        _run(params, averager, rank, 6, 8)
        # Loaded at world 2 from a state saved at world 4: the same re-agreement at the next call.
        fresh_params = [torch.nn.Parameter(p.clone()) for p in saved_params]
        for p in fresh_params:
            p.grad = torch.zeros_like(p)
        fresh = HierarchicalModelAverager(config, outer_optimizers={1: factory, 2: factory})
        fresh.load_state_dict(saved)
        _run(fresh_params, fresh, rank, 5, 7)  # steps 5 and 6 (the world level)
        out[name] = {
            "steps_kept": [(p, n, v + (1 if p == "1" and n == "step" else 0)) for p, n, v in steps_before] == steps_after,
            "has_0d_state": bool(steps_before),
            "floats_agree_after_reagreeing": _all_equal(floats) if floats else None,
            "fresh_steps": fresh.step,
            "params_agree_after_world_level": _all_equal(fresh_params),
        }
    return out


def test_outer_optimizers_with_tensor_state_survive_a_world_change():
    results = run_workers(_tensor_state_worker, 4, free_port(), deadline_s=300)
    for result in results[:2]:
        assert set(result) == set(TENSOR_STATE_OPTIMIZERS)
        for name, r in result.items():
            assert r["has_0d_state"] and r["steps_kept"], (name, r)
            assert r["floats_agree_after_reagreeing"], (name, r)
            assert r["fresh_steps"] == 7 and r["params_agree_after_world_level"], (name, r)


# -- item 11: the same world size in another node shape ------------------------------------------


def _node_shape_worker(rank: int, world_size: int) -> dict:
    config = {2: "local", 8: "world"}
    wires = {2: torch.bfloat16}
    params = _params(rank)
    two_nodes = HierarchicalModelAverager(config, comm_dtypes=wires, local_world_size=1)  # 2 nodes x 1
    _run(params, two_nodes, rank, 0, 6)  # steps 2, 4: "local" is each rank alone, its anchors its own
    saved = clone_tree(two_nodes.state_dict())
    two_nodes.release_groups()
    one_node = HierarchicalModelAverager(config, comm_dtypes=wires, local_world_size=2)  # 1 node x 2
    one_node.load_state_dict(saved)  # what each rank's own file hands it at the same world size
    _run(params, one_node, rank, 6, 7)  # step 6: "local" (now both ranks) fires
    return {"saved_levels": saved["levels"], "agree": _all_equal(params)}


def test_same_world_in_another_node_shape_re_agrees_the_anchors():
    for result in run_workers(_node_shape_worker, 2, deadline_s=180):
        assert result["saved_levels"] == [[2, 1], [8, 2]]
        assert result["agree"], result


# -- item 12: a parameter layout that differs on one rank -----------------------------------------


def _layout_after_rebuild_worker(rank: int, world_size: int) -> str:
    params = _params(rank)
    averager = HierarchicalModelAverager({2: "world"}, outer_optimizers={2: functools.partial(torch.optim.SGD, lr=1.0)})
    _run(params, averager, rank, 0, 3)
    averager.rebuild()
    given = params[:1] if rank == 1 else params  # rank 1 alone passes other parameters
    try:
        averager.average_parameters(given)
    except ValueError as exc:
        return str(exc)
    return ""


def test_a_layout_mismatch_after_a_rebuild_on_one_rank_raises_on_every_rank():
    errors = run_workers(_layout_after_rebuild_worker, 2, deadline_s=45)
    assert all("rank 1" in e and "(elements, dtype" in e for e in errors), errors


def _layout_at_start_worker(rank: int, world_size: int) -> str:
    params = [torch.nn.Parameter(torch.zeros(6 if rank == 0 else 7))]
    params[0].grad = torch.zeros_like(params[0])
    averager = HierarchicalModelAverager({2: "world"}, comm_dtypes={2: torch.bfloat16})
    try:
        averager.average_parameters(params)  # step 0: the anchors start from the mean over the world
    except ValueError as exc:
        return str(exc)
    return ""


def test_parameters_that_differ_between_ranks_at_the_start_raise_on_every_rank():
    errors = run_workers(_layout_at_start_worker, 2, deadline_s=45)
    assert all("differ between ranks" in e and "[(6, torch.float32" in e and "[(7, torch.float32" in e for e in errors), errors
