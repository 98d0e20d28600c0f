"""A world-size change through the node-local tier: 4 gloo processes on 2 "nodes" save, 2 resume.

The resumed world reads the local steps the old one left (own and buddy copies, no cloud step
exists) and every rank gets the mean of the 4 saved replicas, as from the cloud tier.
"""

from __future__ import annotations

import os

from tests.distributed import run_workers


def _state(rank: int):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(float(rank + 1))  # replicas differ, as between averaging points
    return {"model": model, "epoch": 5}


def _save_at_four(rank: int, world_size: int, root: str) -> list[list[float]]:
    from elastic_hsgd import CheckpointManager

    os.environ["GROUP_RANK"] = str(rank // 2)  # ranks 0, 1 on node 0; 2, 3 on node 1
    manager = CheckpointManager(f"{root}/cloud", local_url=f"{root}/node{rank // 2}", local_every=5)
    state = _state(rank)
    assert manager.maybe_save(5, state) == ("local",)
    manager.local.wait()
    assert manager.local_committed_step == 5
    manager.close()
    return [p.detach().reshape(-1).tolist() for p in state["model"].parameters()]


def _resume_at_two(rank: int, world_size: int, root: str) -> tuple:
    import torch

    from elastic_hsgd import CheckpointManager

    os.environ["GROUP_RANK"] = str(rank)  # one rank on each node, in the same folders
    manager = CheckpointManager(f"{root}/cloud", local_url=f"{root}/node{rank}", local_every=5)
    state = _state(100 + rank)
    state["epoch"] = -1
    step = manager.load_latest(state)
    source, saved_world = manager.last_source, manager.last_loaded.world_size
    manager.close()
    params = [p.detach().reshape(-1).tolist() for p in state["model"].parameters()]
    assert all(torch.isfinite(torch.tensor(p)).all() for p in params)
    return step, source, saved_world, state["epoch"], params


def test_four_ranks_save_locally_and_two_resume_with_the_mean_of_the_replicas(tmp_path):
    import torch

    saved = run_workers(_save_at_four, 4, str(tmp_path))
    resumed = run_workers(_resume_at_two, 2, str(tmp_path))
    expected = [torch.tensor([r[i] for r in saved], dtype=torch.float64).mean(0) for i in range(2)]
    for step, source, saved_world, epoch, params in resumed:
        assert (step, saved_world, epoch) == (5, 4, 5)
        assert source in ("local", "buddy")  # nothing in the cloud: every file came from the node folders
        for got, want in zip(params, expected):
            assert torch.allclose(torch.tensor(got, dtype=torch.float64), want, atol=1e-6)
    assert resumed[0][4] == resumed[1][4]  # the same mean on every rank
    assert not any(n.startswith("step_") for n in os.listdir(tmp_path / "cloud"))
