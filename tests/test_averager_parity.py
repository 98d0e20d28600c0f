"""Our averager against torch's own, in 4 real gloo processes."""

from __future__ import annotations

import warnings
from collections import OrderedDict


from tests.distributed import run_workers

HIERARCHIES = [
    [(2, 2), (4, 4)],
    [(2, 2), (4, 4), (8, 4)],
    [(1, 2), (4, "world")],
]
WARMUPS = [0, 3, 10]
STEPS = 24


def _model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _parity_worker(rank: int, world_size: int) -> list[str]:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
        HierarchicalModelAverager as TorchAverager,
    )

    from elastic_hsgd import HierarchicalModelAverager

    checked = []
    for hierarchy in HIERARCHIES:
        torch_dict = OrderedDict((p, world_size if s == "world" else s) for p, s in hierarchy)
        for warmup in WARMUPS:
            for as_param_groups in (False, True):
                ours_model, torch_model = _model(0), _model(0)
                ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.1)
                torch_opt = torch.optim.SGD(torch_model.parameters(), lr=0.1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ours = HierarchicalModelAverager(OrderedDict(hierarchy), warmup_steps=warmup)
                    theirs = TorchAverager(torch_dict, warmup_steps=warmup)
                gen = torch.Generator().manual_seed(1000 + rank)
                for step in range(STEPS):
                    x = torch.randn(4, 7, generator=gen)
                    for model, opt in ((ours_model, ours_opt), (torch_model, torch_opt)):
                        opt.zero_grad()
                        model(x).square().sum().backward()
                        opt.step()
                    before = [p.detach().clone() for p in ours_model.parameters()]
                    ours.average_parameters(ours_opt.param_groups if as_param_groups else ours_model.parameters())
                    theirs.average_parameters(torch_opt.param_groups if as_param_groups else torch_model.parameters())
                    assert ours.step == theirs.step == step + 1
                    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
                        assert a.dtype == b.dtype and a.shape == b.shape
                        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{hierarchy} warmup={warmup} step={step}")
                    changed = any(not torch.equal(a, b) for a, b in zip(before, ours_model.parameters()))
                    fired = step >= warmup and any(step % p == 0 for p, _ in hierarchy)
                    assert changed == fired, (hierarchy, warmup, step, changed)
                    # Ranks of one group hold identical parameters right after it averaged.
                    if fired:
                        period = max(p for p, _ in hierarchy if step % p == 0)
                        size = torch_dict[period]
                        flat = torch.cat([p.detach().reshape(-1) for p in ours_model.parameters()])
                        gathered = [torch.empty_like(flat) for _ in range(world_size)]
                        dist.all_gather(gathered, flat)
                        block = rank - rank % size
                        for other in range(block, block + size):
                            assert torch.equal(gathered[other], flat)
                checked.append(f"{hierarchy}/{warmup}/{as_param_groups}")
    return checked


def test_matches_torch_averager_step_by_step():
    results = run_workers(_parity_worker, 4, deadline_s=240)
    assert all(len(r) == len(HIERARCHIES) * len(WARMUPS) * 2 for r in results)
