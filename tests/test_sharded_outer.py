"""tests/test_outer.py's float64 reference again, with sharded parameters (issue 21).

Eight gloo processes as 4 replicas x 2 shards: replica ``r`` plays the reference's rank
``r``, each of its two ranks holding one slice of every parameter (DTensors placed
``(Replicate(), Shard(0))`` on a 4 x 2 mesh, 3 rows split 2 + 1). Group sizes count
ranks, so the reference's groups of 2 and 4 ranks are groups of 4 and 8 ranks here.
Each rank adds its slice of its replica's noise, averages its local shards, and each
replica's ``full_tensor()`` must match the reference's rank, as in test_outer.py.

Left out: the int8 scenario. int8 scales rows of consecutive elements of the flat
buffer, and a shard's buffer holds other elements side by side than the whole model's,
so its rounding differs by design (elementwise bf16/fp16 rounding does not).
"""

from __future__ import annotations

import functools

import pytest

from tests.distributed import run_workers

torch = pytest.importorskip("torch")

from elastic_hsgd import HierarchicalModelAverager  # noqa: E402
from tests.test_outer import NESTEROV, SCENARIOS, STEPS, WORLD, _flat, _initial, _noise, reference  # noqa: E402

SHARDS = 2
PLAIN_SGD = functools.partial(torch.optim.SGD, lr=1.0)
FEASIBLE = [s for s in SCENARIOS if torch.int8 not in s[3].values()]


def _ranks(config: dict) -> dict:
    """The reference's group sizes (replicas) as group sizes in ranks."""
    return {p: s if s == "world" else s * SHARDS for p, s in config.items()}


def _sharded_model(mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    return [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Replicate(), Shard(0)])) for t in _initial()]


def _run(params, averager, replica: int, shard: int, start: int, steps: int) -> None:
    init = _initial()
    for step in range(start, steps):
        with torch.no_grad():
            for p, noise in zip(params, _noise(replica, step, init)):
                p.to_local().add_(torch.chunk(noise, SHARDS, dim=0)[shard])
        averager.average_parameters(params)


def _averager(config, outers, wires, warmup, factory=NESTEROV):
    return HierarchicalModelAverager(
        _ranks(config), warmup_steps=warmup, outer_optimizers={p: factory for p in outers}, comm_dtypes=dict(wires)
    )


def _full(params) -> list:
    return _flat([p.full_tensor() for p in params]).tolist()


def _worker(rank: int, world_size: int, warmup: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD, SHARDS), mesh_dim_names=("replicate", "shard"))
    replica, shard = divmod(rank, SHARDS)
    out: dict = {}
    for name, config, outers, wires in FEASIBLE:
        params = _sharded_model(mesh)
        _run(params, _averager(config, outers, wires, warmup), replica, shard, 0, STEPS)
        out[name] = _full(params)
    # Outer SGD(lr=1.0) on every level equals plain averaging, shard by shard too.
    config = {2: 2, 4: 4, 8: "world"}
    sgd_params, plain_params = _sharded_model(mesh), _sharded_model(mesh)
    sgd = _averager(config, config, {}, warmup, factory=PLAIN_SGD)
    plain = HierarchicalModelAverager(_ranks(config), warmup_steps=warmup)
    worst = 0.0
    for step in range(STEPS):
        for params, averager in ((sgd_params, sgd), (plain_params, plain)):
            _run(params, averager, replica, shard, step, step + 1)
        worst = max(worst, max((a.to_local() - b.to_local()).abs().max().item() for a, b in zip(sgd_params, plain_params)))
    out["sgd vs plain"] = worst
    out["anchor elements"] = sum(a.numel() for a in sgd._anchored[0].anchors)
    return out


@pytest.mark.parametrize("name", [s[0] for s in FEASIBLE])
def test_sharded_averager_follows_the_float64_reference(name, sharded_results):
    _, config, outers, wires = next(s for s in FEASIBLE if s[0] == name)
    expected = reference(config, {p: NESTEROV for p in outers}, wires, 3, STEPS)
    atol = 1e-3 if wires else 2e-6  # as in test_outer.py
    for rank, result in enumerate(sharded_results):
        got = torch.tensor(result[name], dtype=torch.float64)
        torch.testing.assert_close(got, expected[rank // SHARDS], rtol=0, atol=atol, msg=f"{name} rank {rank}")


def test_sharded_outer_sgd_lr_one_is_plain_averaging_and_anchors_hold_one_shard(sharded_results):
    for result in sharded_results:
        assert result["sgd vs plain"] <= 1e-6
    # This rank's slices only, padded to the largest (the same size on every rank): 2 of the
    # 3 rows of the float32 3x5 and 3, and 2 of the 4 rows of the float64 4x3.
    assert [r["anchor elements"] for r in sharded_results[:2]] == [2 * 5 + 2 + 2 * 3] * 2


@pytest.fixture(scope="module")
def sharded_results():
    warmup = 3  # as test_outer.py: the first call at or after warmup starts the anchors
    return run_workers(_worker, WORLD * SHARDS, warmup, deadline_s=600)
