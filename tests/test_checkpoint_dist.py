"""CheckpointManager with 4 real gloo processes: exact resume, world-size changes, failures."""

from __future__ import annotations

import textwrap
from datetime import timedelta

import pytest

from tests.distributed import free_port, run_workers

HIERARCHY = {2: 2, 4: "world"}


def _setup(rank: int, seed: int = 0):
    import torch

    from elastic_hsgd import HierarchicalModelAverager

    torch.manual_seed(seed)  # same initial model everywhere
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    averager = HierarchicalModelAverager(HIERARCHY, warmup_steps=1)
    torch.manual_seed(1000 + rank)  # per-rank data stream, from the global RNG on purpose
    return {"model": model, "optimizer": optimizer, "averager": averager}


def _train(state, steps: range) -> None:
    import torch

    model, optimizer, averager = state["model"], state["optimizer"], state["averager"]
    for _ in steps:
        x = torch.randn(16, 5)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
        optimizer.step()
        averager.average_parameters(model.parameters())


def _params(model) -> list:
    return [p.detach().clone() for p in model.parameters()]


def _floats(state) -> list[float]:
    """Every floating value a checkpoint averages: parameters and momentum buffers, as float64."""
    import torch

    optimizer = state["optimizer"]
    tensors = [*state["model"].parameters(), *(optimizer.state[p]["momentum_buffer"] for p in state["model"].parameters())]
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]).tolist()


def _exact_resume_worker(rank: int, world_size: int, url: str, options: dict | None) -> bool:
    import torch

    from elastic_hsgd import CheckpointManager

    reference = _setup(rank)
    _train(reference, range(0, 11))

    manager = CheckpointManager(url, storage_options=options, keep=2)
    run = _setup(rank)
    _train(run, range(0, 7))
    manager.save(7, run)  # step 7: between averaging points, ranks differ
    _train(run, range(7, 9))  # work after the checkpoint that the "crash" loses
    manager.save(9, run, blocking=False)
    manager.wait()

    resumed = _setup(rank, seed=42)  # a fresh process would start from anything
    manager.load(7, resumed)
    assert resumed["averager"].step == 7
    _train(resumed, range(7, 11))
    exact = all(torch.equal(a, b) for a, b in zip(_params(resumed["model"]), _params(reference["model"])))
    manager.close()
    return exact


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_resume_at_same_world_size_is_bit_exact(storage, tmp_path, request):
    if storage == "local":
        url, options = str(tmp_path / "ckpt"), None
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        url = f"{bucket}/run"
    assert run_workers(_exact_resume_worker, 4, url, options) == [True] * 4


def _reinit(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))


def _world_change_worker(rank: int, world_size: int, url: str, port2: int, port4: int) -> dict:
    import torch
    import torch.distributed as dist

    from elastic_hsgd import CheckpointManager

    report: dict = {}
    state = _setup(rank)
    manager = CheckpointManager(url)
    _train(state, range(0, 6))
    manager.save(6, state)
    report["saved_6"] = _floats(state)
    manager.close()
    dist.destroy_process_group()

    if rank < 2:  # 4 -> 2
        _reinit(rank, 2, port2)
        state = _setup(rank, seed=7)
        manager = CheckpointManager(url)
        assert manager.load_latest(state) == 6
        report["at_2"] = (manager.last_loaded.world_size, state["averager"].step, [lv.group_size for lv in state["averager"].levels])
        report["loaded_6"] = _floats(state)
        _train(state, range(6, 9))  # step 8 averages over the whole world of 2
        manager.save(9, state)
        report["saved_9"] = _floats(state)
        flat = torch.cat([p.detach().reshape(-1) for p in state["model"].parameters()])
        both = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(both, flat)
        report["replicas_equal_after_global_step"] = torch.equal(both[0], both[1])
        manager.close()
        dist.destroy_process_group()

    _reinit(rank, 4, port4)  # 2 -> 4
    state = _setup(rank, seed=8)
    manager = CheckpointManager(url)
    assert manager.load_latest(state) == 9
    report["at_4"] = (manager.last_loaded.world_size, state["averager"].step, [lv.group_size for lv in state["averager"].levels])
    report["loaded_9"] = _floats(state)
    _train(state, range(9, 13))
    manager.save(13, state)
    report["steps"] = manager.steps()
    manager.close()
    return report


def test_resume_across_world_sizes_4_2_4(tmp_path):
    reports = run_workers(_world_change_worker, 4, str(tmp_path / "ckpt"), free_port(), free_port())
    for rank in (0, 1):
        assert reports[rank]["at_2"] == (4, 6, [2, 2])
        assert reports[rank]["replicas_equal_after_global_step"]
    for rank in range(4):
        assert reports[rank]["at_4"] == (2, 9, [2, 4])
        assert reports[rank]["steps"] == [6, 9, 13]
    # Every new rank holds the mean of all saved replicas, the same on every rank.
    import torch

    saved_6 = torch.tensor([reports[r]["saved_6"] for r in range(4)], dtype=torch.float64)
    assert not torch.equal(saved_6[0], saved_6[3])  # the replicas really differ
    for rank in (0, 1):
        assert reports[rank]["loaded_6"] == reports[0]["loaded_6"]
        torch.testing.assert_close(torch.tensor(reports[rank]["loaded_6"], dtype=torch.float64), saved_6.mean(0), rtol=1e-6, atol=1e-7)
    saved_9 = torch.tensor([reports[r]["saved_9"] for r in range(2)], dtype=torch.float64)
    assert not torch.equal(saved_9[0], saved_9[1])  # momentum differs even after the global average
    for rank in range(4):
        assert reports[rank]["loaded_9"] == reports[0]["loaded_9"]
        torch.testing.assert_close(torch.tensor(reports[rank]["loaded_9"], dtype=torch.float64), saved_9.mean(0), rtol=1e-6, atol=1e-7)


def _differing_counters_worker(rank: int, world_size: int, url: str) -> None:
    import torch

    from elastic_hsgd import CheckpointManager

    manager = CheckpointManager(url)
    manager.save(1, {"w": torch.full((4,), float(rank)), "count": 5, "ints": torch.tensor([7, 8])})
    manager.save(2, {"w": torch.full((4,), float(rank)), "count": rank, "ints": torch.tensor([7, 8])})
    manager.close()


def test_integer_state_must_agree_to_average_replicas(tmp_path):
    import torch

    from elastic_hsgd import CheckpointManager
    from elastic_hsgd.checkpoint import CheckpointError

    url = str(tmp_path / "ckpt")
    run_workers(_differing_counters_worker, 2, url, deadline_s=150)
    manager = CheckpointManager(url)  # one process: world size 1, reads both saved ranks
    state = {"w": torch.zeros(4), "count": 0, "ints": torch.zeros(2, dtype=torch.int64)}
    with pytest.raises(CheckpointError, match=r"saved ranks \[1\] differ .*/count: int 0 vs int 1"):
        manager.load(2, state)
    assert manager.load(1, state) == 1
    assert torch.equal(state["w"], torch.full((4,), 0.5)) and state["count"] == 5 and state["ints"].tolist() == [7, 8]


def _one_rank_fails_worker(rank: int, world_size: int, url: str) -> str:
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from elastic_hsgd import CheckpointManager
    from elastic_hsgd.checkpoint import CheckpointError

    class BrokenOnRankOne(LocalFileSystem):
        # LocalFileSystem strips this protocol itself: brokenonone:///tmp/x is /tmp/x.
        protocol = ("brokenonone",)

        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode and rank == 1 and path.endswith(".safetensors"):
                raise ConnectionResetError("injected: storage unreachable from rank 1")
            return super()._open(path, mode, **kwargs)

    fsspec.register_implementation("brokenonone", BrokenOnRankOne, clobber=True)
    manager = CheckpointManager(f"brokenonone://{url}", retries=1, retry_backoff_s=0.01)
    assert manager.storage.root == url, manager.storage.root  # absolute: the files land in tmp_path
    state = _setup(rank)
    try:
        manager.save(1, state)
    except CheckpointError as exc:
        message = str(exc)
    else:
        message = ""
    assert manager.steps() == []
    return message


def test_a_save_failing_on_one_rank_raises_on_every_rank(tmp_path):
    messages = run_workers(_one_rank_fails_worker, 4, str(tmp_path / "ckpt"), deadline_s=180)
    # Every rank raises; the reason is printed once, by rank 0 (issue 14: no N x N copies in a log).
    assert "rank 1: " in messages[0] and "storage unreachable from rank 1" in messages[0]
    for message in messages[1:]:
        assert message.endswith("failed on 1 rank(s); rank 0 reports the reasons"), message


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from tests.faulty_fs import register
    from elastic_hsgd import CheckpointManager
    register()
    manager = CheckpointManager("blockingfile://" + sys.argv[1])
    manager.save(1, {"weights": torch.full((4,), 1.0)})
    print("saved 1", flush=True)
    manager.save(2, {"weights": torch.full((4,), 2.0), "ballast": torch.zeros(2**20)})
    print("saved 2", flush=True)
    """
)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    import torch

    from elastic_hsgd import CheckpointManager
    from elastic_hsgd.checkpoint.layout import step_dir_name
    from tests.faulty_fs import BLOCK_MARKER_ENV, BLOCK_MATCH_ENV, sigkill_when_parked

    url = tmp_path / "ckpt"
    marker = tmp_path / "mid-write"
    # The filesystem parks the writer after the first chunk of step 2's rank file: the kill lands mid-save.
    blocking = {BLOCK_MATCH_ENV: f"{step_dir_name(2)}/rank_00000", BLOCK_MARKER_ENV: str(marker)}
    printed = sigkill_when_parked(KILL_SCRIPT, [str(url)], marker, blocking, "save of step 2 never started")
    assert printed.split() == ["saved", "1"]
    partial = url / step_dir_name(2)
    assert (partial / "rank_00000.safetensors").exists() and not (partial / "COMMIT.json").exists()
    manager = CheckpointManager(str(url))
    assert manager.steps() == [1]
    state = {"weights": torch.zeros(4)}
    assert manager.load_latest(state) == 1 and torch.equal(state["weights"], torch.full((4,), 1.0))
    manager.save(3, state)
    assert not partial.exists() and manager.steps() == [1, 3]
