"""Anchored levels (hierarchical DiLoCo, compressed averaging): pure math, then the averager
in real gloo processes checked against a single-process float64 simulation of the
semantics in HierarchicalModelAverager's docstring."""

from __future__ import annotations

import functools

import pytest

from tests.distributed import clone_tree, run_workers

torch = pytest.importorskip("torch")

from elastic_hsgd import HierarchicalModelAverager  # noqa: E402
from elastic_hsgd import outer  # noqa: E402
from elastic_hsgd.hierarchy import block_of, level_for_step  # noqa: E402

WORLD = 4
STEPS = 21
NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
PLAIN_SGD = functools.partial(torch.optim.SGD, lr=1.0)

# (name, {period: size}, {period: outer?}, {period: wire dtype})
SCENARIOS = [
    ("three levels, plain middle", {2: 2, 4: 4, 8: "world"}, {2: True, 8: True}, {8: torch.bfloat16}),
    ("compression only", {1: 2, 3: "world"}, {}, {3: torch.float16}),
    ("outer on every level", {2: 2, 6: "world"}, {2: True, 6: True}, {}),
    ("int8 top, outer below", {2: 2, 4: "world"}, {2: True, 4: True}, {4: torch.int8}),
]


# -- pure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outer_optimizers, comm_dtypes, error, message",
    [
        ({3: NESTEROV}, None, ValueError, "period 3, which is not a configured period"),
        (None, {8: torch.bfloat16}, ValueError, "comm_dtypes has period 8"),
        (None, {4: torch.uint8}, ValueError, "supported wire dtypes"),
        (None, {4: torch.float32}, ValueError, "comm_dtypes\\[4\\] is torch.float32"),
        ({4: "sgd"}, None, TypeError, "not a callable"),
    ],
)
def test_level_options_are_validated(outer_optimizers, comm_dtypes, error, message):
    with pytest.raises(error, match=message):
        outer.check_level_options([2, 4], outer_optimizers, comm_dtypes)


def test_compressed_mean_sums_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    deltas = [torch.randn(1001, dtype=torch.float64) for _ in range(4)]
    exact = torch.stack(deltas).mean(0)
    for wire, eps in ((torch.bfloat16, 2**-8), (torch.float16, 2**-11)):
        mean = outer.simulate_compressed_mean(deltas, wire)
        # Each input rounded once, the mean rounded once: within two half-ulps of the inputs' scale.
        bound = 2 * eps * torch.stack(deltas).abs().max(0).values
        assert (mean - exact).abs().le(bound).all()
        assert not torch.equal(mean, exact)
    assert torch.equal(outer.simulate_compressed_mean(deltas, None), exact)


def test_wire_round_trip_through_the_slices_equals_the_simulation():
    torch.manual_seed(1)
    n, numel = 3, 10
    deltas = [torch.randn(numel) for _ in range(n)]
    padded, per_rank = outer.wire_layout(numel, n)
    assert (padded, per_rank) == (12, 4)
    wires = []
    for d in deltas:
        w = torch.empty(padded, dtype=torch.bfloat16)
        outer.encode(d, w)
        assert torch.equal(w[numel:], torch.zeros(2, dtype=torch.bfloat16))
        wires.append(w)
    gathered = torch.empty(padded, dtype=torch.bfloat16)
    for rank in range(n):  # what all_to_all hands rank `rank`: everyone's slice `rank`
        received = torch.cat([w[rank * per_rank : (rank + 1) * per_rank] for w in wires])
        total, mine = torch.empty(per_rank), torch.empty(per_rank, dtype=torch.bfloat16)
        outer.reduce_slices(received, n, total, mine)
        gathered[rank * per_rank : (rank + 1) * per_rank] = mine
    out = torch.empty(numel)
    outer.decode(gathered, out)
    assert torch.equal(out, outer.simulate_compressed_mean(deltas, torch.bfloat16))


def test_int8_rows_round_to_within_half_a_step_of_their_own_scale():
    torch.manual_seed(2)
    n = 3 * outer.INT8_ROW + 17  # a partial last row
    x = torch.randn(n) * torch.logspace(-4, 1, n)  # rows of very different magnitudes
    x[outer.INT8_ROW : 2 * outer.INT8_ROW] = 0.0  # an all-zero row
    padded, _ = outer.wire_layout(n, 1, torch.int8)
    assert padded == 4 * outer.INT8_ROW
    q, scales = torch.empty(padded, dtype=torch.int8), torch.empty(4)
    outer.encode(x, q, scales)
    assert torch.equal(q[n:], torch.zeros(padded - n, dtype=torch.int8))  # padding is zero
    assert scales[1] == 0 and q[outer.INT8_ROW : 2 * outer.INT8_ROW].eq(0).all()
    assert q.abs().max() == 127  # every nonzero row uses the full range
    out = torch.empty(n)
    outer.decode(q, out, scales)
    step = scales.repeat_interleave(outer.INT8_ROW)[:n]
    assert (out - x).abs().le(step / 2 + 1e-12).all()
    assert (out - x).abs().max() > 0  # it is lossy: the bound above is what holds


def test_int8_wire_round_trip_through_the_slices_equals_the_simulation():
    torch.manual_seed(3)
    n, numel = 3, 2 * outer.INT8_ROW + 5
    deltas = [torch.randn(numel) * 0.1 for _ in range(n)]
    padded, per_rank = outer.wire_layout(numel, n, torch.int8)
    assert (padded, per_rank) == (3 * outer.INT8_ROW, outer.INT8_ROW)  # slices are whole rows
    rows = outer.scale_count(per_rank, torch.int8)
    wires = []
    for d in deltas:
        w, sc = torch.empty(padded, dtype=torch.int8), torch.empty(outer.scale_count(padded, torch.int8))
        outer.encode(d, w, sc)
        wires.append((w, sc))
    gathered, gathered_scales = torch.empty(padded, dtype=torch.int8), torch.empty(n * rows)
    for rank in range(n):  # what all_to_all hands rank `rank`: everyone's slice `rank`, values and scales
        received = torch.cat([w[rank * per_rank : (rank + 1) * per_rank] for w, _ in wires])
        received_scales = torch.cat([sc[rank * rows : (rank + 1) * rows] for _, sc in wires])
        total, mine, mine_scales = torch.empty(per_rank), torch.empty(per_rank, dtype=torch.int8), torch.empty(rows)
        outer.reduce_slices(received, n, total, mine, None, received_scales, mine_scales)
        gathered[rank * per_rank : (rank + 1) * per_rank] = mine
        gathered_scales[rank * rows : (rank + 1) * rows] = mine_scales
    out = torch.empty(numel)
    outer.decode(gathered, out, gathered_scales)
    assert torch.equal(out, outer.simulate_compressed_mean(deltas, torch.int8))
    exact = torch.stack(deltas).mean(0)
    assert (out - exact).abs().max() < 2 * torch.stack(deltas).abs().max() / 127


def test_outer_sgd_lr_one_is_subtracting_the_mean_delta():
    anchor = torch.tensor([1.0, -2.0, 3.0])
    other = anchor.clone()
    mean = torch.tensor([0.25, 0.5, -1.0])
    outer.outer_update(anchor, mean.clone(), PLAIN_SGD([anchor]))
    outer.outer_update(other, mean.clone(), None)
    assert torch.equal(anchor, other) and anchor.grad is None


# -- reference simulation (single process, float64) ---------------------------------


def _initial(seed: int = 0) -> list:
    torch.manual_seed(seed)
    return [torch.randn(3, 5), torch.randn(3), torch.randn(4, 3, dtype=torch.float64)]


def _noise(rank: int, step: int, like: list) -> list:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.05 for t in like]


def _flat(tensors: list) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def reference(config: dict, outers: dict, wires: dict, warmup: int, steps: int) -> list:
    """Every rank's flat parameters after ``steps`` calls, per the averager's documented semantics."""
    periods = list(config)
    sizes = {p: WORLD if s == "world" else s for p, s in config.items()}
    anchored = [p for p in periods if p in outers or p in wires]
    init = _initial()
    kinds = [([0, 1], torch.float32), ([2], torch.float64)]  # the averager's flat buffers
    params = [[_flat([init[i] for i in kind]) for kind, _ in kinds] for _ in range(WORLD)]
    anchors: dict = {}
    optimizers: dict = {}
    for step in range(steps):
        for rank in range(WORLD):
            noise = _noise(rank, step, init)
            for k, (kind, _) in enumerate(kinds):
                params[rank][k] += _flat([noise[i] for i in kind])
        if step >= warmup and not anchors and anchored:
            means = [torch.stack([params[r][k] for r in range(WORLD)]).mean(0) for k in range(len(kinds))]
            for p in anchored:
                anchors[p] = [[m.clone() for m in means] for _ in range(WORLD)]
                optimizers[p] = [outers[p](anchors[p][r]) if p in outers else None for r in range(WORLD)]
        index = level_for_step(step, warmup, periods)
        if index is None:
            continue
        period = periods[index]
        for start in range(0, WORLD, sizes[period]):
            block = block_of(start, sizes[period])
            if period in anchors:
                for k, (_, dtype) in enumerate(kinds):
                    deltas = [(anchors[period][r][k] - params[r][k]).to(dtype) for r in block]
                    mean = outer.simulate_compressed_mean(deltas, wires.get(period)).double()
                    for r in block:
                        anchors[period][r][k].grad = mean.clone()
                for r in block:
                    opt = optimizers[period][r]
                    if opt is None:
                        for a in anchors[period][r]:
                            a -= a.grad
                            a.grad = None
                    else:
                        opt.step()
                    params[r] = [a.detach().clone() for a in anchors[period][r]]
            else:
                for k in range(len(kinds)):
                    mean = torch.stack([params[r][k] for r in block]).mean(0)
                    for r in block:
                        params[r][k] = mean.clone()
            for r in block:
                for lower in anchors:
                    if lower < period:
                        for a, value in zip(anchors[lower][r], params[r]):
                            a.copy_(value)
    return [torch.cat(params[r]) for r in range(WORLD)]


def _model():
    init = _initial()
    params = [torch.nn.Parameter(t.clone()) for t in init]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


def _run(params: list, averager, rank: int, start: int, steps: int) -> None:
    for step in range(start, steps):
        with torch.no_grad():
            for p, n in zip(params, _noise(rank, step, params)):
                p.add_(n)
        averager.average_parameters(params)


def _averager(config, outers, wires, warmup, factory=NESTEROV):
    return HierarchicalModelAverager(
        dict(config),
        warmup_steps=warmup,
        outer_optimizers={p: factory for p in outers},
        comm_dtypes=dict(wires),
    )


def _semantics_worker(rank: int, world_size: int, warmup: int) -> dict:
    out: dict = {}
    for name, config, outers, wires in SCENARIOS:
        params = _model()
        averager = _averager(config, outers, wires, warmup)
        _run(params, averager, rank, 0, STEPS)
        out[name] = _flat(params).tolist()  # plain values: tensors do not outlive the process
        if name == SCENARIOS[0][0]:
            # The same run with fp32 on the wire, for the bf16-vs-fp32 comparison.
            params32 = _model()
            _run(params32, _averager(config, outers, {}, warmup), rank, 0, STEPS)
            out["fp32 wire"] = _flat(params32).tolist()
    # Outer SGD(lr=1.0) on every level equals plain averaging.
    config = {2: 2, 4: 4, 8: "world"}
    sgd_params, plain_params = _model(), _model()
    sgd = _averager(config, config, {}, warmup, factory=PLAIN_SGD)
    plain = HierarchicalModelAverager(config, warmup_steps=warmup)
    for step in range(STEPS):
        for params, averager in ((sgd_params, sgd), (plain_params, plain)):
            _run(params, averager, rank, step, step + 1)
        torch.testing.assert_close(_flat(sgd_params), _flat(plain_params), rtol=0, atol=1e-6, msg=f"step {step}")
    return out


def test_averager_follows_the_documented_semantics():
    warmup = 3  # the first call at or after warmup (step 3) starts anchors without firing a level
    results = [
        {k: torch.tensor(v, dtype=torch.float64) for k, v in r.items()}
        for r in run_workers(_semantics_worker, WORLD, warmup, deadline_s=300)
    ]
    for name, config, outers, wires in SCENARIOS:
        expected = reference(config, {p: NESTEROV for p in outers}, wires, warmup, STEPS)
        # Compressed levels: a delta that lands on a rounding boundary may round the other way
        # in the float64 reference; that is one wire ulp of a ~0.1 delta.
        atol = (1e-2 if torch.int8 in wires.values() else 1e-3) if wires else 2e-6
        for rank in range(WORLD):
            torch.testing.assert_close(results[rank][name], expected[rank], rtol=0, atol=atol, msg=f"{name} rank {rank}")
        top = max(config)
        if (STEPS - 1) % top == 0:  # the last call synchronized the world: every rank agrees exactly
            assert all(torch.equal(results[r][name], results[0][name]) for r in range(WORLD))
    # bf16 on the top level stays close to fp32, and is not the same computation.
    name = SCENARIOS[0][0]
    for rank in range(WORLD):
        diff = (results[rank][name] - results[rank]["fp32 wire"]).abs().max().item()
        assert 0 < diff < 5e-3, diff


def test_reference_tells_outer_steps_from_plain_averaging():
    """The reference check above can fail: dropping the outer optimizer changes the result."""
    name, config, outers, wires = SCENARIOS[2]
    with_outer = reference(config, {p: NESTEROV for p in outers}, wires, 0, STEPS)
    without = reference(config, {}, {p: torch.float16 for p in outers}, 0, STEPS)
    assert (with_outer[0] - without[0]).abs().max() > 1e-2


def _state_worker(rank: int, world_size: int) -> dict:
    name, config, outers, wires = SCENARIOS[0]
    params = _model()
    averager = _averager(config, outers, wires, 3)
    _run(params, averager, rank, 0, 11)
    saved, saved_params = clone_tree(averager.state_dict()), [p.detach().clone() for p in params]
    assert set(saved["outer"]["anchors"]) == {"2", "8"} and "8" in saved["outer"]["optimizers"]
    assert all(isinstance(t, torch.Tensor) for t in saved["outer"]["anchors"]["8"])
    _run(params, averager, rank, 11, STEPS)

    resumed_params = _model()
    with torch.no_grad():
        for p, value in zip(resumed_params, saved_params):
            p.copy_(value)
    resumed = _averager(config, outers, wires, 3)
    resumed.load_state_dict(saved)
    _run(resumed_params, resumed, rank, 11, STEPS)
    identical = all(torch.equal(a, b) for a, b in zip(params, resumed_params))

    errors = {}
    for label, build in {
        "no outer": lambda: HierarchicalModelAverager(config, warmup_steps=3),
        "other dtype": lambda: _averager(config, outers, {8: torch.float16}, 3),
        "other levels": lambda: _averager(config, {8: True}, wires, 3),
    }.items():
        try:
            build().load_state_dict(saved)
        except ValueError as exc:
            errors[label] = str(exc)
    try:
        other = _averager(config, outers, wires, 3)
        other.load_state_dict(saved)
        smaller = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
        for p in smaller:
            p.grad = torch.zeros_like(p)
        other.average_parameters(smaller)
    except ValueError as exc:
        errors["shapes"] = str(exc)
    return {"identical": identical, "errors": errors}


def test_state_dict_round_trip_is_bit_identical_and_load_validates():
    results = run_workers(_state_worker, WORLD, deadline_s=300)
    for result in results:
        assert result["identical"]
        errors = result["errors"]
        assert "this averager has none" in errors["no outer"]
        assert "[8, 'bfloat16', True]" in errors["other dtype"] and "float16" in errors["other dtype"]
        assert "configure outer_optimizers and comm_dtypes" in errors["other levels"]
        assert "anchors for period 2 have (elements, dtype)" in errors["shapes"]


def test_plain_configuration_state_stays_plain_values(single_process_group):
    import json

    averager = HierarchicalModelAverager({2: "world"})
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    for _ in range(3):
        averager.average_parameters(model.parameters())
    assert "outer" not in json.loads(json.dumps(averager.state_dict()))


def _world_change_worker(rank: int, world_size: int, port: int) -> dict:
    from datetime import timedelta

    import torch.distributed as dist

    params = _model()
    # Groups of one on the lower level: its anchors and momentum differ between ranks.
    averager = _averager({1: 1, 4: "world"}, [1, 4], {}, 0)
    _run(params, averager, rank, 0, 7)
    lower = averager._anchored[0]
    before = [a.clone() for a in lower.anchors] + [t.clone() for s in lower.optimizer.state.values() for t in s.values()]
    dist.destroy_process_group()
    if rank >= 2:
        return {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    averager.rebuild()
    averager._start_anchors(params)  # what the next call does first after a rebuild
    after = [a for a in lower.anchors] + [t for s in lower.optimizer.state.values() for t in s.values()]
    means = []
    for t in before:
        out = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(out, t)
        means.append((out[0] + out[1]) / 2)
    for got, mean in zip(after, means):
        torch.testing.assert_close(got, mean, rtol=1e-6, atol=1e-7)
    differed = any(not torch.equal(a, m) for a, m in zip(before, means))
    _run(params, averager, rank, 7, 9)  # and training goes on at world 2
    return {"differed": differed, "steps": averager.step}


def test_anchors_and_outer_state_are_averaged_over_the_new_world_after_rebuild():
    from tests.distributed import free_port

    results = run_workers(_world_change_worker, WORLD, free_port(), deadline_s=300)
    for result in results[:2]:
        assert result["differed"]  # the lower level's state differed between ranks before
        assert result["steps"] == 9


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.int8])
def test_outer_step_reuses_its_buffers(single_process_group, wire):
    params = _model()
    averager = HierarchicalModelAverager(
        {1: "world"}, outer_optimizers={1: NESTEROV}, comm_dtypes={1: wire}
    )

    def pointers():
        level = averager._anchored[0]
        tensors = [*params, *averager._deltas, *level.anchors, *[t for w in averager._wire.values() for t in w.tensors()]]
        tensors += [t for s in level.optimizer.state.values() for t in s.values()]
        return [t.data_ptr() for t in tensors]

    _run(params, averager, 0, 0, 2)
    before = pointers()
    _run(params, averager, 0, 2, 6)
    assert pointers() == before and len(before) == 3 + 2 + 2 + 2 * 10 + 2
