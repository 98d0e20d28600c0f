"""One anchored level with outer Nesterov matches torchft's DiLoCo, side by side.

Two real processes; each is a torchft replica group of one (its own Manager and
ProcessGroupGloo, joined through torchft's real lighthouse) and, at the same
time, a rank of a gloo world running elastic_hsgd's averager on a twin model
with the same initial weights, data and optimizers.
"""

from __future__ import annotations

import functools

import pytest

from tests.distributed import run_workers

torch = pytest.importorskip("torch")
pytest.importorskip("torchft")

SYNC_EVERY = 4
SYNCS = 3


def _model() -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _worker(rank: int, world_size: int, lighthouse_addr: str) -> dict:
    from bench.torchft_peer import torchft_diloco
    from elastic_hsgd import HierarchicalModelAverager

    theirs, ours = _model(), _model()
    inner_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    inner_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    averager = HierarchicalModelAverager(
        {SYNC_EVERY: "world"},
        outer_optimizers={SYNC_EVERY: functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)},
    )
    # The documented recipe for torchft's schedule: one call before the first
    # inner step starts the anchor at the initial weights.
    for p in ours.parameters():
        p.grad = torch.zeros_like(p)
    averager.average_parameters(ours.parameters())

    gen = torch.Generator().manual_seed(100 + rank)
    diffs, moved = [], []
    with torchft_diloco(lighthouse_addr, f"replica_{rank}", theirs, inner_theirs, SYNC_EVERY) as peer:
        for step in range(1, SYNC_EVERY * SYNCS + 1):
            x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            for model, inner in ((theirs, inner_theirs), (ours, inner_ours)):
                inner.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                inner.step()  # torchft syncs inside this on every SYNC_EVERY-th step
            averager.average_parameters(ours.parameters())
            if step % SYNC_EVERY == 0:
                a = torch.cat([p.detach().reshape(-1) for p in theirs.parameters()])
                b = torch.cat([p.detach().reshape(-1) for p in ours.parameters()])
                diffs.append((a - b).abs().max().item())
                moved.append((b - torch.cat([p.reshape(-1) for p in _model().parameters()])).abs().max().item())
        committed = peer.manager_steps
        participants = peer.manager.num_participants()
        sent = peer.allreduce_bytes
    final = torch.cat([p.detach().reshape(-1) for p in ours.parameters()]).tolist()
    return {"diffs": diffs, "moved": moved, "committed": committed, "participants": participants, "sent": sent, "final": final}


def test_one_level_outer_nesterov_matches_torchft_diloco():
    from bench.torchft_peer import start_lighthouse

    lighthouse = start_lighthouse(min_replicas=2)
    try:
        results = run_workers(_worker, 2, lighthouse.address(), deadline_s=300)
    finally:
        lighthouse.shutdown()
    n_params = sum(p.numel() for p in _model().parameters())
    for result in results:
        assert result["committed"] == SYNCS and result["participants"] == 2  # torchft really synced, twice a pair
        assert result["sent"] == SYNCS * n_params * 4
        assert len(result["diffs"]) == SYNCS
        assert max(result["moved"]) > 1e-2  # training moved the weights: the match is not trivial
        assert max(result["diffs"]) < 1e-5, result["diffs"]
    assert results[0]["final"] == results[1]["final"]  # ours: every rank agrees exactly after a sync
