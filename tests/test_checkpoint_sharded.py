"""Checkpoints of FSDP2 (DTensor) state with real gloo processes: exact resume, mean of replicas, resharding."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tests.distributed import run_workers

STEP = 3


def _plain_model(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def _model(replicas: int, shards: int, seed: int = 0, hsdp: bool = False):
    """An FSDP2 model over the shard dim of a (replicas, shards) mesh (uneven: 13 rows over 2 or 4, 3 over 4), and AdamW.

    ``hsdp``: sharded over the whole 2-D mesh instead (placements ``Replicate(), Shard(0)``).
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _plain_model(seed)
    mesh = init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))
    fully_shard(model, mesh=mesh if hsdp else mesh["shard"])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model, optimizer, steps: int, rank: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(1000 + rank)  # every rank its own data: the replicas drift apart
    for _ in range(steps):
        x = torch.randn(8, 5, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), x[:, :3]).backward()
        optimizer.step()


def _full(model, optimizer) -> dict:
    """Every parameter and Adam moment as a full tensor (collective over each replica's shard mesh), and the steps."""
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        out[name] = p.full_tensor().clone()
        out[f"{name}.exp_avg"] = state["exp_avg"].full_tensor().clone()
        out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].full_tensor().clone()
        out[f"{name}.step"] = state["step"].clone()
    return out


def _locals(model, optimizer) -> dict:
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.to_local().clone()
        for key, value in optimizer.state[p].items():
            out[f"{name}.{key}"] = (value.to_local() if hasattr(value, "to_local") else value).clone()
    return out


def _lists(tensors: dict) -> dict:
    """Tensors as (dtype, nested lists): what a worker can hand back through a queue (floats exactly)."""
    return {k: (str(t.dtype).removeprefix("torch."), t.tolist()) for k, t in tensors.items()}


def _tensors(lists: dict) -> dict:
    import torch

    return {k: torch.tensor(v, dtype=getattr(torch, d)) for k, (d, v) in lists.items()}


def _save_worker(rank: int, world_size: int, url: str, replicas: int, shards: int, hsdp: bool = False) -> dict:
    import torch

    from elastic_hsgd import CheckpointManager

    model, optimizer = _model(replicas, shards, hsdp=hsdp)
    _train(model, optimizer, STEP, rank)
    with CheckpointManager(url) as manager:
        manager.save(STEP, {"model": model, "optimizer": optimizer})
    return {"full": _lists(_full(model, optimizer)), "locals": _lists(_locals(model, optimizer)), "draw": torch.rand(3).tolist()}


def _load_worker(rank: int, world_size: int, url: str, replicas: int, shards: int, hostile: bool = False, ranged: bool = True) -> dict:
    import torch
    from torch.distributed.tensor import DTensor

    from elastic_hsgd.checkpoint.sharded_load import load_sharded_step
    from elastic_hsgd.checkpoint.storage import CheckpointError
    from elastic_hsgd.checkpoint.tiers.cloud import CloudTier
    from elastic_hsgd.collectives import Peers
    from elastic_hsgd.checkpoint.storage import Storage

    model, optimizer = _model(replicas, shards, seed=1)  # other values: the load must overwrite them
    state = {"model": model, "optimizer": optimizer}
    peers = Peers.own_gloo_group(timedelta(seconds=60), CheckpointError)
    storage = Storage(url)
    tier = CloudTier(storage, peers, keep=3)
    try:
        loaded = load_sharded_step(state, tier.reader(STEP), peers, storage=storage if ranged else None)
    except CheckpointError as exc:
        if hostile:
            return {"error": str(exc)}
        raise
    finally:
        tier.close()
        peers.release()
    kinds = sorted({type(v).__name__ for p in model.parameters() for k, v in optimizer.state[p].items() if k != "step"})
    out = {"exact": loaded.exact, "bytes_read": loaded.bytes_read, "shard_bytes_read": loaded.shard_bytes_read, "full": _lists(_full(model, optimizer)), "locals": _lists(_locals(model, optimizer)), "draw": torch.rand(3).tolist()}
    out["kinds"], out["dtensor_params"] = kinds, all(isinstance(p, DTensor) for p in model.parameters())
    _train(model, optimizer, 2, rank)  # training continues from the loaded state
    out["after"] = _lists(_full(model, optimizer))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A step saved by 4 ranks as 2 replicas x 2 shards; the save workers' full tensors and locals."""
    url = str(tmp_path_factory.mktemp("sharded") / "ckpt")
    return url, run_workers(_save_worker, 4, url, 2, 2)


def _mean_of_replicas(results: list[dict], replica_ranks: list[int]) -> dict:
    import torch

    out = {}
    fulls = [_tensors(results[r]["full"]) for r in replica_ranks]
    for key, first in fulls[0].items():
        if key.endswith(".step"):
            out[key] = first
            continue
        total = sum(full[key].double() for full in fulls)
        out[key] = (total / len(replica_ranks)).to(first.dtype)
    return out


def _assert_equal(got: dict, expected: dict) -> None:
    import torch

    got = _tensors(got)
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_same_layout_is_bit_identical(saved):
    import torch

    url, before = saved
    after = run_workers(_load_worker, 4, url, 2, 2)
    for rank in range(4):
        assert after[rank]["exact"] is True
        _assert_equal(after[rank]["locals"], _tensors(before[rank]["locals"]))
        assert after[rank]["draw"] == before[rank]["draw"]  # RNG restored
        assert after[rank]["kinds"] == ["DTensor"] and after[rank]["dtensor_params"]


def test_fewer_replicas_same_shards_get_the_mean_of_replicas(saved):
    url, before = saved
    expected = _mean_of_replicas(before, [0, 2])
    after = run_workers(_load_worker, 2, url, 1, 2)
    for rank in range(2):
        assert after[rank]["exact"] is False
        _assert_equal(after[rank]["full"], expected)
        assert after[rank]["kinds"] == ["DTensor"]


def test_another_shard_layout_is_resharded_to_the_mean_of_replicas(saved):
    import torch

    url, before = saved
    expected = _mean_of_replicas(before, [0, 2])
    for replicas, shards in ((1, 4), (2, 1)):
        after = run_workers(_load_worker, replicas * shards, url, replicas, shards)
        for result in after:
            assert result["exact"] is False
            _assert_equal(result["full"], expected)
            assert result["kinds"] == ["DTensor"]
            assert all(torch.isfinite(t).all() for t in _tensors(result["after"]).values())  # and training goes on
        assert not torch.equal(_tensors(after[0]["after"])["0.weight"], expected["0.weight"])


def test_the_replicas_differ_and_every_uneven_shard_is_saved(saved):
    import torch

    _, before = saved
    a, b = _tensors(before[0]["full"]), _tensors(before[2]["full"])
    assert not torch.equal(a["0.weight"], b["0.weight"])  # the mean of replicas is not any one of them
    assert [len(before[r]["locals"]["0.weight"][1]) for r in range(4)] == [7, 6, 7, 6]


def test_resharding_reads_only_the_overlapping_bytes_and_works_from_any_tier(saved):
    url, before = saved
    expected = _mean_of_replicas(before, [0, 2])
    after = run_workers(_load_worker, 4, url, 1, 4)
    fetched = run_workers(_load_worker, 4, url, 1, 4, False, False)  # through the tier's fetch, no ranged reads
    for ranged, whole in zip(after, fetched):
        local_bytes = sum(t.numel() * t.element_size() for k, t in _tensors(ranged["locals"]).items() if not k.endswith(".step"))
        assert ranged["shard_bytes_read"] == 2 * local_bytes  # this rank's box from each of the 2 saved replicas
        assert ranged["bytes_read"] < 2 * 1440  # less than two whole replicas (120 values x 3 tensors x 4 bytes)
        _assert_equal(whole["full"], expected)


def test_hsdp_mesh_saved_and_loaded_as_fsdp(tmp_path):
    url = str(tmp_path / "hsdp")
    before = run_workers(_save_worker, 4, url, 2, 2, True)
    after = run_workers(_load_worker, 2, url, 1, 2)
    expected = _mean_of_replicas(before, [0, 2])  # HSDP keeps its replicas equal: the mean is each of them
    _assert_equal(after[0]["full"], expected)
    _assert_equal(after[0]["full"], _tensors(before[0]["full"]))


def test_export_loads_into_an_unsharded_model_as_the_mean_of_replicas(saved, tmp_path):
    import torch
    from safetensors.torch import load_file

    from elastic_hsgd.checkpoint.export import export_model
    from elastic_hsgd.checkpoint.storage import Storage

    url, before = saved
    expected = _mean_of_replicas(before, [0, 2])
    done = export_model(Storage(url), str(tmp_path / "model.safetensors"))
    assert done.replicas == (0, 2)
    model = _plain_model(seed=5)
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name
    export_model(Storage(url), str(tmp_path / "rank3.safetensors"), rank=3)  # saved rank 3's replica: ranks 2 and 3
    replica = _tensors(before[2]["full"])
    for name, tensor in load_file(str(tmp_path / "rank3.safetensors")).items():
        assert torch.equal(tensor, replica[name]), name


def test_inspect_shows_global_shapes_and_the_saved_layout(saved, capsys):
    from elastic_hsgd.__main__ import main

    url, _ = saved
    assert main(["inspect", url]) == 0
    shown = json.loads(capsys.readouterr().out)
    model = shown["entries"]["model"]
    assert model["sharded_tensors"] == 4 and model["global_shapes"]["0.weight"] == [13, 5]
    assert model["layouts"] == {"Shard(0) over mesh (shard=2) of ranks [0, 1]": 4}
    assert shown["entries"]["optimizer"]["sharded_tensors"] == 8


def _not_sharded_worker(rank: int, world_size: int, url: str) -> str:
    import torch

    from elastic_hsgd import CheckpointManager
    from elastic_hsgd.checkpoint.storage import CheckpointError

    model = _plain_model()
    with CheckpointManager(url) as manager:
        try:
            manager.load(STEP, {"model": model, "optimizer": torch.optim.AdamW(model.parameters())})
        except CheckpointError as exc:
            return str(exc)
    return "loaded"


def test_a_model_that_is_not_sharded_is_a_clear_error(saved):
    url, _ = saved
    errors = run_workers(_not_sharded_worker, 4, url)
    assert all("must already be sharded" in e and "fully_shard" in e and "0.weight" in e for e in errors), errors[0]


def test_a_model_that_is_not_sharded_at_another_world_size_is_told_to_shard_or_export(saved):
    url, _ = saved
    errors = run_workers(_not_sharded_worker, 2, url)  # saved by 4 ranks: the mean of replicas would mix slices
    for error in errors:
        assert "holds sharded (FSDP2 / DTensor) state" in error and "is not sharded" in error, error
        assert "fully_shard the model the way it was saved" in error and "python -m elastic_hsgd export" in error, error
        assert "merge= option does not apply" in error and "merge={" not in error, error


def _tamper(source: str, target: str, saved_ranks: list[int], change) -> None:
    """A copy of the checkpoint whose given rank files ``change`` rewrote (commit record updated, so they verify)."""
    import shutil
    import zlib
    from pathlib import Path

    from elastic_hsgd.checkpoint import format as fileformat

    shutil.copytree(source, target)
    step_dir = Path(target) / f"step_{STEP:012d}"
    commit = json.loads((step_dir / "COMMIT.json").read_text())
    for saved_rank in saved_ranks:
        path = step_dir / f"rank_{saved_rank:05d}.safetensors"
        payload = fileformat.decode(bytearray(path.read_bytes()))
        change(payload)
        data = b"".join(bytes(c) for c in fileformat.encode(payload))
        path.write_bytes(data)
        entry = next(f for f in commit["files"] if f["name"] == path.name)
        entry["checksum"], entry["bytes"] = f"crc32:{zlib.crc32(data):08x}", len(data)
    (step_dir / "COMMIT.json").write_text(json.dumps(commit))


def _overlap(payload):
    payload["model"]["0.weight"]["offset"] = [6, 0]  # rows 6..11: overlaps saved rank 0's rows 0..6


def _wrong_size(payload):
    payload["model"]["0.weight"]["size"] = [7, 5]  # the tensor holds 6 rows


def _missing(payload):
    del payload["model"]["2.bias"]


@pytest.mark.parametrize(
    "change, ranks, world, message",
    [
        (_overlap, [1], 2, "claims the box at offset [6, 0]"),
        (_overlap, [1], 4, "claims the box at offset [6, 0]"),
        (_wrong_size, [1, 3], 2, "has shape [6, 5] but its record says size [7, 5]"),
        (_missing, [1, 3], 2, "saved ranks [1, 3] lack the sharded tensor model/2.bias"),
    ],
    ids=["overlap", "overlap-same-world", "size", "missing"],
)
def test_hostile_layouts_are_checkpoint_errors(saved, tmp_path, change, ranks, world, message):
    url, _ = saved
    hostile = str(tmp_path / "hostile")
    _tamper(url, hostile, ranks, change)
    results = run_workers(_load_worker, world, hostile, 1, world, True)
    assert all("error" in r for r in results)
    assert message in results[0]["error"], results[0]["error"]


def _manager_load_worker(rank: int, world_size: int, url: str, replicas: int, shards: int) -> dict:
    import torch

    from elastic_hsgd import CheckpointManager

    model, optimizer = _model(replicas, shards, seed=1)
    with CheckpointManager(url) as manager:
        step = manager.load_latest({"model": model, "optimizer": optimizer})
    return {"step": step, "full": _lists(_full(model, optimizer)), "locals": _lists(_locals(model, optimizer)), "draw": torch.rand(3).tolist()}


def test_checkpoint_manager_resumes_sharded_state_exactly_or_resharded(saved):
    url, before = saved
    same = run_workers(_manager_load_worker, 4, url, 2, 2)
    for rank in range(4):
        assert same[rank]["step"] == STEP and same[rank]["draw"] == before[rank]["draw"]
        _assert_equal(same[rank]["locals"], _tensors(before[rank]["locals"]))
    resharded = run_workers(_manager_load_worker, 4, url, 1, 4)
    expected = _mean_of_replicas(before, [0, 2])
    for result in resharded:
        assert result["step"] == STEP
        _assert_equal(result["full"], expected)


def _unsharded_save_worker(rank: int, world_size: int, url: str) -> dict:
    import torch

    from elastic_hsgd import CheckpointManager

    model = _plain_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, STEP, rank)
    with CheckpointManager(url) as manager:
        manager.save(STEP, {"model": model, "optimizer": optimizer})
    full = {}
    for name, p in model.named_parameters():
        full[name] = p.detach().clone()
        full.update({f"{name}.{k}": v.clone() for k, v in optimizer.state[p].items()})
    return {"full": _lists(full)}


def test_an_unsharded_checkpoint_loads_into_an_fsdp2_model_as_the_mean_of_replicas(tmp_path):
    url = str(tmp_path / "ddp")
    before = run_workers(_unsharded_save_worker, 4, url)
    after = run_workers(_manager_load_worker, 2, url, 1, 2)
    _assert_equal(after[0]["full"], _mean_of_replicas(before, [0, 1, 2, 3]))
