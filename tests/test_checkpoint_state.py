"""What a load does to the objects of ``state``: plain entries updated in place, model names without
wrapper prefixes, nothing keeping the read buffer alive, and per-entry merge policies at another world size."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from elastic_hsgd import CheckpointManager
from elastic_hsgd.checkpoint import CheckpointError
from tests.distributed import free_port, run_workers

# -- plain entries are updated in place (issue 20.3) -------------------------------------------------


def test_plain_dict_list_and_tensor_entries_are_updated_in_place(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    saved_data = {"epoch": 3, "nested": {"seen": [1, 2]}, "t": torch.arange(3.0)}
    manager.save(1, {"data": saved_data, "history": [1, {"a": 2}, (4, 5)], "w": torch.ones(2), "grown": torch.arange(4.0)})

    data = {"epoch": 0, "nested": {"seen": []}, "t": torch.zeros(3), "stale": 1}
    nested, t = data["nested"], data["t"]
    history = [0, {"a": 0}, (0, 0)]
    inner = history[1]
    w = torch.zeros(2, requires_grad=True)  # a leaf the loop holds, e.g. a learnable scalar
    state = {"data": data, "history": history, "w": w, "grown": torch.zeros(1)}
    assert manager.load_latest(state) == 1
    # The objects the training loop holds see the loaded values.
    assert state["data"] is data and state["history"] is history and state["w"] is w
    assert data["epoch"] == 3 and data["nested"] is nested and nested["seen"] == [1, 2]
    assert data["t"] is t and torch.equal(t, torch.arange(3.0))
    assert "stale" not in data  # the entry is what was saved, nothing more
    assert history[1] is inner and history == [1, {"a": 2}, (4, 5)]
    assert torch.equal(w.detach(), torch.ones(2)) and w.requires_grad
    # A tensor of another shape cannot take the values in place: the entry is replaced.
    assert torch.equal(state["grown"], torch.arange(4.0))
    manager.close()


# -- torch.compile and DDP prefixes (issue 20.4) ------------------------------------------------------


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_compiled_and_eager_models_load_each_others_checkpoints(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    compiled = torch.compile(_net(1))  # lazy: nothing compiles until it is called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    manager.save(1, {"model": compiled})
    assert sorted(manager.commit_record(1).entries["model"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    eager = _net(2)
    manager.load(1, {"model": eager})
    assert _same(eager, compiled)

    manager.save(2, {"model": _net(3)})
    recompiled = torch.compile(_net(4))
    manager.load(2, {"model": recompiled})
    assert _same(recompiled, _net(3))

    # A compiled submodule: `_orig_mod.` in the middle of a key.
    partly = _net(5)
    partly[0] = torch.compile(partly[0])
    manager.save(3, {"model": partly})
    eager = _net(6)
    manager.load(3, {"model": eager})
    assert _same(eager, partly)
    manager.close()


def test_ddp_wrapped_and_plain_models_load_each_others_checkpoints(tmp_path, single_process_group):
    from torch.nn.parallel import DistributedDataParallel

    manager = CheckpointManager(str(tmp_path / "ckpt"))
    wrapped = DistributedDataParallel(_net(1))
    assert all(k.startswith("module.") for k in wrapped.state_dict())
    manager.save(1, {"model": wrapped})
    plain = _net(2)
    manager.load(1, {"model": plain})
    assert _same(plain, wrapped.module)

    manager.save(2, {"model": _net(3)})
    rewrapped = DistributedDataParallel(_net(4))
    manager.load(2, {"model": rewrapped})
    assert _same(rewrapped.module, _net(3))
    manager.close()


# -- a load keeps no view of the file it read (issue 19.8) -------------------------------------------


def test_loaded_state_keeps_no_view_of_the_read_buffer(tmp_path, monkeypatch):
    from elastic_hsgd.checkpoint.storage import Storage

    buffers: list[bytearray] = []
    read_into = Storage.read_into

    def spy(self, path, nbytes):
        buffer, checksum = read_into(self, path, nbytes)
        buffers.append(buffer)
        return buffer, checksum

    monkeypatch.setattr(Storage, "read_into", spy)
    model = _net(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(1, {"model": model, "optimizer": optimizer, "plain": {"t": torch.arange(5.0)}, "grown": torch.arange(6.0)})

    fresh = _net(1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    state = {"model": fresh, "optimizer": fresh_optimizer, "plain": {}, "grown": torch.zeros(1)}
    buffers.clear()
    manager.load(1, state)
    assert buffers, "the spy saw no read"
    for buffer in buffers:  # whatever still views a read buffer would change now
        buffer[:] = bytes(len(buffer))
    for p, q in zip(fresh.parameters(), model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh_optimizer.state[p][key], optimizer.state[q][key]), key
    assert torch.equal(state["plain"]["t"], torch.arange(5.0)) and torch.equal(state["grown"], torch.arange(6.0))
    manager.close()


def _float64_worker(rank: int, world_size: int, url: str) -> None:
    model = _net(rank).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(url)
    manager.save(1, {"model": model, "optimizer": optimizer})
    manager.close()


def test_mean_of_replicas_hands_out_tensors_of_their_own_size(tmp_path):
    url = str(tmp_path / "ckpt")
    run_workers(_float64_worker, 2, url)
    model = _net(9).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    manager = CheckpointManager(url)  # world 1 reads both saved replicas
    manager.load(1, {"model": model, "optimizer": optimizer})
    for p in model.parameters():
        momentum = optimizer.state[p]["momentum_buffer"]
        # A float64 slot of the accumulator would keep every replica's float64 sum alive.
        assert momentum.untyped_storage().nbytes() == momentum.numel() * momentum.element_size()
    manager.close()


# -- merge policies for per-rank state at another world size (issue 20.8) ----------------------------


def test_merge_policies_combine_values_and_refuse_unknown_names(tmp_path):
    from elastic_hsgd.checkpoint.merge import combine

    assert combine("min", [3.0, 1.0, 2.0]) == 1.0 and combine("max", [3, 1, 2]) == 3
    assert combine("mean", [1.0, 2.0]) == 1.5 and combine("mean", [1, 2, 4]) == 2 and combine("rank0", [7, 8]) == 7
    assert torch.equal(combine("min", [torch.tensor([1, 5]), torch.tensor([3, 2])]), torch.tensor([1, 2]))
    assert combine("max", [False, True]) is True and combine("equal", ["a", "a"]) == "a"
    with pytest.raises(ValueError, match="differ"):
        combine("equal", [1, 2])
    with pytest.raises(ValueError, match=r"merge=\{'scaler': 'median'\}.*'equal', 'rank0', 'min', 'max', 'mean'"):
        CheckpointManager(str(tmp_path / "ckpt"), merge={"scaler": "median"})


def _reinit(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))


def _per_rank_state(rank: int) -> dict:
    """A model under a real GradScaler and ReduceLROnPlateau whose state drifted per rank, as under local SGD."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", growth_interval=100)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=100)
    torch.manual_seed(rank)
    for step in range(rank + 1):  # rank r: r + 1 good steps; rank 3's last step overflows
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(4, 3)).float().pow(2).mean()
        scaler.scale(loss * (float("inf") if rank == 3 and step == rank else 1.0)).backward()
        scaler.step(optimizer)
        scaler.update()
    plateau.step(10.0 + rank)
    return {
        "model": model, "optimizer": optimizer, "scaler": scaler, "plateau": plateau,
        "stats": {"seen": 10 * rank}, "avg": {"loss": float(rank)}, "counter": {"n": rank},
    }


def _drifted_worker(rank: int, world_size: int, url: str, port2: int) -> dict:
    import torch.distributed as dist

    state = _per_rank_state(rank)
    saved = {"scaler": state["scaler"].state_dict(), "plateau_best": state["plateau"].best}
    manager = CheckpointManager(url)
    manager.save(1, state)
    manager.close()
    dist.destroy_process_group()
    report: dict = {"saved": saved}
    if rank >= 2:
        return report
    _reinit(rank, 2, port2)  # 4 -> 2
    plain = CheckpointManager(url)  # no policy for the plain entries: the error names one and the fix
    report["no_policy"] = "loaded without an error"
    try:
        plain.load(1, _per_rank_state(6))
    except CheckpointError as exc:
        report["no_policy"] = str(exc)
    plain.close()
    resumed = _per_rank_state(5)
    stats = resumed["stats"]
    manager = CheckpointManager(url, merge={"stats": "max", "avg": "mean", "counter": "min"})
    manager.load(1, resumed)
    report["scaler"] = resumed["scaler"].state_dict()
    report["plateau_best"] = resumed["plateau"].best
    report["plain"] = (stats, resumed["avg"], resumed["counter"])
    manager.close()
    return report


def test_drifted_grad_scalers_and_schedulers_resume_at_another_world_size(tmp_path):
    reports = run_workers(_drifted_worker, 4, str(tmp_path / "ckpt"), free_port(), deadline_s=180)
    saved = [r["saved"] for r in reports]
    assert len({s["scaler"]["_growth_tracker"] for s in saved}) > 1, "the scalers did not drift"
    assert len({s["scaler"]["scale"] for s in saved}) > 1, "rank 3's overflow did not back its scale off"
    for rank in (0, 1):
        r = reports[rank]
        assert "'avg'" in r["no_policy"] and "merge={'avg': " in r["no_policy"], r["no_policy"]
        # GradScaler: the smallest scale of the saved replicas, and a fresh growth count.
        assert r["scaler"]["scale"] == min(s["scaler"]["scale"] for s in saved)
        assert r["scaler"]["_growth_tracker"] == 0
        assert r["plateau_best"] == saved[0]["plateau_best"] == 10.0  # ReduceLROnPlateau: saved rank 0's
        assert r["plain"] == ({"seen": 30}, {"loss": 1.5}, {"n": 0})  # max, mean, min
