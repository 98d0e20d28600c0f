"""Overlapped syncs (``sync_delays={period: tau}``): pure maths, then the averager in real gloo
processes against a single-process float64 reference of the semantics (docs/averager.md,
"Overlapped syncs"), with local steps that depend on the parameters."""

from __future__ import annotations

import functools

import pytest

from tests.distributed import clone_tree, run_workers

torch = pytest.importorskip("torch")

from elastic_hsgd import HierarchicalModelAverager  # noqa: E402
from elastic_hsgd import outer  # noqa: E402
from elastic_hsgd.hierarchy import block_of, level_for_step  # noqa: E402

WORLD = 4
STEPS = 19
WARMUP = 3
NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)

# (name, {period: size}, periods with Nesterov, {period: wire dtype}, {period: tau})
SCENARIOS = [
    ("plain fp32, tau 1", {4: "world"}, (), {}, {4: 1}),
    ("plain fp32, tau 2", {4: "world"}, (), {}, {4: 2}),
    ("nesterov, tau 2", {4: "world"}, (4,), {}, {4: 2}),
    ("nesterov bf16, tau 1", {4: "world"}, (4,), {4: torch.bfloat16}, {4: 1}),
    ("int8, tau 2", {4: "world"}, (), {4: torch.int8}, {4: 2}),
    # The top (8) in flight when the lower level fires at 10: completed first, at 10.
    ("two levels, lower fires in flight", {2: 2, 8: "world"}, (2, 8), {8: torch.bfloat16}, {8: 3}),
    ("two levels, tau 1", {2: 2, 8: "world"}, (2, 8), {}, {8: 1}),
]


# -- pure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "delays, message",
    [
        ({4: 4}, r"sync_delays\[4\] is 4, not below the level's period 4.*at most 3"),
        ({2: 5}, r"sync_delays\[2\] is 5"),
        ({4: -1}, r"sync_delays\[4\] is -1: it must be a non-negative int"),
        ({4: 1.5}, r"sync_delays\[4\] is 1.5"),
        ({4: True}, r"sync_delays\[4\] is True"),
        ({3: 1}, r"sync_delays has period 3, which is not a configured period \[2, 4\]"),
    ],
)
def test_bad_sync_delays_are_value_errors(delays, message):
    with pytest.raises(ValueError, match=message):
        outer.check_sync_delays([2, 4], delays)
    with pytest.raises(ValueError, match=message):  # before any collective
        HierarchicalModelAverager({2: 2, 4: "world"}, sync_delays=delays)


def test_zero_delays_are_left_out():
    assert outer.check_sync_delays([2, 4], {2: 0, 4: 3}) == {4: 3}
    assert outer.check_sync_delays([2, 4], None) == {}


def test_delayed_correction_against_float64():
    torch.manual_seed(0)
    snapshot, params, anchor = (torch.randn(1000) for _ in range(3))
    expected = params.double() + (anchor.double() - snapshot.double())
    out = torch.empty(1000)
    got = params.clone()
    outer.delayed_correction(got, anchor, snapshot, out)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 8)
    assert torch.equal(out, anchor - snapshot)
    # No local step since the snapshot: the new anchor, up to one rounding.
    same = snapshot.clone()
    outer.delayed_correction(same, anchor, snapshot, snapshot.clone())
    torch.testing.assert_close(same, anchor, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-7)
    # `out` may be the snapshot itself (its last use).
    reused = params.clone()
    outer.delayed_correction(reused, anchor, snapshot.clone(), snapshot)
    assert torch.equal(reused, got)


def test_reference_tells_the_correction_from_params_equal_anchor():
    """The reference check below can fail: dropping the correction (params := anchor at completion) shows."""
    _, config, outers, wires, delays = SCENARIOS[1]
    right = reference(config, outers, wires, delays, STEPS)
    wrong = reference(config, outers, wires, delays, STEPS, correct=False)
    assert (right[0] - wrong[0]).abs().max() > 1e-2


# -- reference simulation (single process, float64) ---------------------------------


def _initial() -> list:
    torch.manual_seed(0)
    return [torch.randn(3, 5), torch.randn(7)]


def _target(rank: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(like.shape, generator=g).to(like.dtype)  # float32 draws in both


def local_step(flat: torch.Tensor, rank: int, step: int) -> None:
    """In place: a step that depends on the parameters (with parameter-independent steps the correction hides bugs)."""
    target = _target(rank, flat)
    g = torch.Generator().manual_seed(1000 * rank + step)
    noise = torch.randn(flat.shape, generator=g).to(flat.dtype) * 0.02
    flat.sub_(0.2 * torch.tanh(flat - target) * (1 + 0.5 * torch.sigmoid(flat)) - noise)


def reference(config, outers, wires, delays, steps, correct=True) -> list:
    """Every rank's flat parameters after ``steps`` calls, per the documented semantics, in float64."""
    periods, sizes = list(config), {p: WORLD if s == "world" else s for p, s in config.items()}
    anchored = [p for p in periods if p in outers or p in wires or p in delays]
    init = torch.cat([t.reshape(-1) for t in _initial()]).double()
    params = [init.clone() for _ in range(WORLD)]
    anchors: dict = {}
    opts: dict = {}
    flight = None  # (period, completes_at, snapshots, {rank: mean delta})

    def finish(delayed=True):
        period, _, snapshots, means = flight
        for r in range(WORLD):
            anchor = anchors[period][r]
            if opts[period][r] is None:
                anchor -= means[r]
            else:
                anchor.grad = means[r].clone()
                opts[period][r].step()
                anchor.grad = None
            keep = delayed and correct  # the local steps since the snapshot
            params[r] = params[r] + (anchor.detach() - snapshots[r]) if keep else anchor.detach().clone()
            for lower in anchors:
                if lower < period:  # the new anchor, the same on every rank of the group (tau 0: = params)
                    anchors[lower][r].copy_(anchor.detach())

    for step in range(steps):
        for r in range(WORLD):
            local_step(params[r], r, step)
        if step >= WARMUP and not anchors and anchored:
            mean = torch.stack(params).mean(0)
            for p in anchored:
                anchors[p] = [mean.clone() for _ in range(WORLD)]
                opts[p] = [NESTEROV([anchors[p][r]]) if p in outers else None for r in range(WORLD)]
        index = level_for_step(step, WARMUP, periods)
        if flight is not None and (index is not None or flight[1] <= step):
            finish()
            flight = None
        if index is None:
            continue
        period = periods[index]
        means = {}
        for start in range(0, WORLD, sizes[period]):
            block = block_of(start, sizes[period])
            if period not in anchors:
                mean = torch.stack([params[r] for r in block]).mean(0)
                for r in block:
                    params[r] = mean.clone()
                continue
            deltas = [(anchors[period][r] - params[r]).float() for r in block]
            mean = outer.simulate_compressed_mean(deltas, wires.get(period)).double()
            for r in block:
                means[r] = mean
        if period in delays:
            flight = (period, step + delays[period], [p.clone() for p in params], means)
            continue
        if period in anchors:
            flight = (period, step, [p.clone() for p in params], means)
            finish(delayed=False)  # tau 0: params := anchor
            flight = None
        for r in range(WORLD):
            for lower in anchors:
                if lower < period:
                    anchors[lower][r].copy_(params[r])
    return params


# -- the averager in gloo processes --------------------------------------------------


def _model() -> list:
    return [torch.nn.Parameter(t.clone()) for t in _initial()]


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _run(params, averager, rank: int, start: int, stop: int) -> None:
    for step in range(start, stop):
        with torch.no_grad():
            flat = _flat(params)
            local_step(flat, rank, step)
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        averager.average_parameters(params)


def _averager(config, outers, wires, delays):
    return HierarchicalModelAverager(
        dict(config), warmup_steps=WARMUP, outer_optimizers={p: NESTEROV for p in outers}, comm_dtypes=dict(wires),
        sync_delays=delays,
    )


def _plain_values(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain_values(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain_values(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))


def _tau_zero_is_today(rank: int) -> dict:
    """tau 0 takes today's code path: params and state after N steps equal an averager without sync_delays."""
    out = {}
    for name, outers, wires in (("plain", (), {}), ("outer", (4,), {}), ("bf16", (4,), {4: torch.bfloat16})):
        runs = []
        for delays in (None, {4: 0}):
            params = _model()
            averager = _averager({2: 2, 4: "world"}, outers, wires, delays)
            _run(params, averager, rank, 0, 14)
            runs.append((_flat(params), averager.state_dict()))
        (a, sa), (b, sb) = runs
        same_state = sa.keys() == sb.keys() and repr(sa.get("outer", {}).keys()) == repr(sb.get("outer", {}).keys())
        anchors_a = [t for ts in sa.get("outer", {}).get("anchors", {}).values() for t in ts]
        anchors_b = [t for ts in sb.get("outer", {}).get("anchors", {}).values() for t in ts]
        same_state = same_state and all(torch.equal(x, y) for x, y in zip(anchors_a, anchors_b))
        out[name] = bool(torch.equal(a, b)) and same_state and sa["step"] == sb["step"]
    return out


def _round_trip(rank: int, url: str) -> dict:
    """Save at s+1 with the top level's sync in flight, resume in a fresh averager: bit-identical,
    directly and through the CheckpointManager's rank files."""
    from elastic_hsgd import CheckpointManager

    name, config, outers, wires, delays = SCENARIOS[5]  # top 8 fires at 8, due at 11 (or at 10: lower fires)
    params = _model()
    averager = _averager(config, outers, wires, delays)
    _run(params, averager, rank, 0, 9)  # the call of step 8 started the sync
    saved = clone_tree(averager.state_dict())
    saved_params = [p.detach().clone() for p in params]
    with CheckpointManager(url) as manager:
        manager.save(9, {"model": torch.nn.ParameterList(params), "averager": averager}, blocking=True)
    _run(params, averager, rank, 9, STEPS)

    loaded_params = _model()
    loaded = _averager(config, outers, wires, delays)
    with CheckpointManager(url) as manager:
        step = manager.load_latest({"model": torch.nn.ParameterList(loaded_params), "averager": loaded})
    _run(loaded_params, loaded, rank, 9, STEPS)
    through_manager = step == 9 and all(torch.equal(a, b) for a, b in zip(params, loaded_params))

    resumed_params = _model()
    with torch.no_grad():
        for p, value in zip(resumed_params, saved_params):
            p.copy_(value)
    resumed = _averager(config, outers, wires, delays)
    resumed.load_state_dict(saved)
    again = resumed.state_dict()  # loaded, not applied yet: saved unchanged
    _run(resumed_params, resumed, rank, 9, STEPS)
    flight = saved["outer"].get("in_flight", {})
    return {
        "identical": all(torch.equal(a, b) for a, b in zip(params, resumed_params)),
        "in_flight": {k: v for k, v in flight.items() if not isinstance(v, list)},
        "tensors": [len(flight.get("snapshot", [])), len(flight.get("mean_delta", []))],
        "plain": _plain_values(saved),
        "pending kept": "in_flight" in again["outer"],
        "done": resumed._anchors.in_flight is None and averager._anchors.in_flight is None,
        "through manager": through_manager,
    }


def _worker(rank: int, world_size: int, url: str) -> dict:
    out: dict = {"semantics": {}}
    for name, config, outers, wires, delays in SCENARIOS:
        params = _model()
        _run(params, _averager(config, outers, wires, delays), rank, 0, STEPS)
        out["semantics"][name] = _flat(params).tolist()
    out["tau zero"] = _tau_zero_is_today(rank)
    out["round trip"] = _round_trip(rank, url)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(_worker, WORLD, str(tmp_path_factory.mktemp("ckpt") / "run"), deadline_s=300)


def test_delayed_syncs_follow_the_float64_reference(results):
    for name, config, outers, wires, delays in SCENARIOS:
        expected = reference(config, outers, wires, delays, STEPS)
        atol = 1e-3 if wires else 1e-5  # compressed: a delta on a rounding boundary may round the other way
        for rank in range(WORLD):
            got = torch.tensor(results[rank]["semantics"][name], dtype=torch.float64)
            torch.testing.assert_close(got, expected[rank], rtol=0, atol=atol, msg=f"{name} rank {rank}")


def test_tau_zero_is_bit_identical_to_no_sync_delays(results):
    for result in results:
        assert result["tau zero"] == {"plain": True, "outer": True, "bf16": True}


def test_state_dict_round_trip_with_a_sync_in_flight(results):
    for result in results:
        trip = result["round trip"]
        assert trip["identical"]
        assert trip["in_flight"] == {"period": 8, "completes_at": 11}
        assert trip["tensors"] == [1, 1]  # one flat buffer: snapshot and reduced mean
        assert trip["plain"] and trip["pending kept"] and trip["done"]
        assert trip["through manager"]  # the snapshot and mean flow through the rank files


# -- the "replicas" top level (a TopLevel stand-in for torchft, as in test_outer_replicas) --


def _replicas_worker(rank: int, world_size: int, ports: tuple[int, int, int]) -> dict:
    from tests import test_outer_replicas as rep

    def run(averager, model, steps, observe=None):
        for step in range(steps):
            rep._local_step(list(model.parameters()), rank, step)
            before = [p.detach().clone() for p in model.parameters()]
            averager.average_parameters(model.parameters())
            if observe is not None:
                observe(step, before)

    # The same hierarchy with an ordinary world level over the 4-rank default group (background reduction).
    ref_model = _model_replicas = rep._model()
    ref = HierarchicalModelAverager({2: rep.GROUP, 4: "world"}, warmup_steps=4, outer_optimizers={4: NESTEROV},
                                    sync_delays={4: 2})
    run(ref, ref_model, 15)
    reference = [p.detach().clone() for p in _model_replicas.parameters()]
    ref.release_groups()

    cross, _store = rep._split_into_replica_groups(rank, world_size, ports)
    out: dict = {}
    # Discarded: the sync fired at 8 with tau 1, due at 9 (no lower level fires there), hands over step 10.
    for discard, tau in ((frozenset(), 2), (frozenset({10}), 1)):
        model = rep._model()
        top = rep.AllRanksTopLevel(cross, discard_steps=discard)
        averager = HierarchicalModelAverager({2: rep.GROUP, 4: "replicas"}, warmup_steps=4, top_level=top,
                                             outer_optimizers={4: NESTEROV}, sync_delays={4: tau})
        record: dict = {}

        def observe(step, before, averager=averager, model=model, record=record, due=8 + tau):
            if step == due - 1:
                record["anchor"] = [a.clone() for a in averager.state_dict()["outer"]["anchors"]["4"]]
            if step == due:
                outer_state = averager.state_dict()["outer"]
                record["kept"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
                record["anchor kept"] = all(torch.equal(a, b) for a, b in zip(record.pop("anchor"), outer_state["anchors"]["4"]))
                record["dropped"] = "in_flight" not in outer_state

        run(averager, model, 15, observe)
        anchors = rep._gather_all(cross, averager.state_dict()["outer"]["anchors"]["4"])
        record["anchors agree"] = all(torch.equal(anchors[0], a) for a in anchors)
        record["calls"] = top.calls
        record["gap"] = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference))
        out["discarded" if discard else "committed"] = record
    return out


def test_replicas_level_with_a_delay_equals_the_world_level_and_a_discarded_sync_applies_no_correction():
    from tests.test_outer_replicas import _ports

    for result in run_workers(_replicas_worker, WORLD, _ports(), deadline_s=300):
        committed, discarded = result["committed"], result["discarded"]
        # Reduced synchronously at s + tau through the top level: the same result as the background one.
        assert committed["gap"] < 1e-5, committed
        # Step 4 starts the anchors (a synchronous sync); 8 and 12 complete tau calls later (handed step + 1).
        assert committed["calls"] == [5, 11, 15] and discarded["calls"] == [5, 10, 14]
        assert committed["anchors agree"] and discarded["anchors agree"]
        assert not committed["kept"] and committed["dropped"]
        assert discarded["kept"] and discarded["anchor kept"] and discarded["dropped"], discarded
        assert discarded["gap"] > 1e-4  # the discarded sync did change the run


def test_rebuild_finishes_a_sync_in_flight_and_a_world_change_drops_a_saved_one(single_process_group):
    from tests.distributed import collect_package_warnings

    warnings = collect_package_warnings()
    params = _model()
    averager = HierarchicalModelAverager({2: "world"}, sync_delays={2: 1})
    _run(params, averager, 0, 0, 3)  # 0: fires (delayed), 1: completes, 2: fires again
    assert averager._anchors.in_flight is not None
    saved = clone_tree(averager.state_dict())
    assert saved["outer"]["in_flight"]["completes_at"] == 3
    averager.rebuild()  # its reduction is done: finished before the groups go
    assert averager._anchors.in_flight is None and not warnings
    _run(params, averager, 0, 3, 5)

    saved["world_size"] = 2  # as if saved at another world size
    other = HierarchicalModelAverager({2: "world"}, sync_delays={2: 1})
    other.load_state_dict(saved)
    assert "in_flight" not in other.state_dict()["outer"]
    assert any("overlapped sync of period 2 in flight is dropped" in w for w in warnings), warnings
    _run(_model(), other, 0, 3, 5)  # and it trains on
