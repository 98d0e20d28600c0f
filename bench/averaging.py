"""Averaging cost: a bare all_reduce vs torch's averager vs ours, side by side.

    python bench/averaging.py [--world-size 4] [--params 10_000_000] [--iters 30]

Starts ``--world-size`` gloo processes on this machine, builds a model of about
``--params`` fp32 parameters, and for a global step and a subgroup step times,
interleaved in one run:

(a) ``dist.all_reduce`` of one pre-flattened buffer of the same bytes over the
    same group: the floor;
(b) torch's ``HierarchicalModelAverager.average_parameters``;
(c) ``elastic_hsgd.HierarchicalModelAverager.average_parameters``.

Prints median milliseconds per call and the ratios c/a and c/b.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (
    HierarchicalModelAverager as TorchAverager,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from elastic_hsgd import HierarchicalModelAverager  # noqa: E402
from tests.distributed import free_port  # noqa: E402


def make_model(n_params: int) -> torch.nn.Module:
    width = 1024
    layers = max(1, round(n_params / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def time_call(fn, group) -> float:
    dist.barrier(group)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    sub = world_size // 2
    cases = {
        # Period 1 at the top: every call is a global step.
        "global step": OrderedDict([(1, world_size)]),
        # Period 1 below a top level that never fires after step 0: every later call is a subgroup step.
        "subgroup step": OrderedDict([(1, sub), (10**9, world_size)]),
    }
    results = {}
    for name, hierarchy in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = TorchAverager(hierarchy, warmup_steps=0)
            ours = HierarchicalModelAverager(hierarchy, warmup_steps=0)
        theirs.step = ours.step = 1  # skip step 0, which the top level would take
        group = ours.period_process_group_dict[1]
        model_theirs, model_ours = make_model(args.params), make_model(args.params)
        n = sum(p.numel() for p in model_ours.parameters())
        floor_buffer = torch.randn(n) * 0.03
        timings: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        calls = {
            "a": lambda: dist.all_reduce(floor_buffer, group=group),
            "b": lambda: theirs.average_parameters(model_theirs.parameters()),
            "c": lambda: ours.average_parameters(model_ours.parameters()),
        }
        for fn in calls.values():  # first calls: connections, our one-time flattening
            fn()
        pointers = [p.data_ptr() for p in model_ours.parameters()]
        for _ in range(args.iters):
            for key, fn in calls.items():
                timings[key].append(time_call(fn, dist.group.WORLD))
        # No per-call allocation: after the first call the parameters stay where they are.
        same_storage = pointers == [p.data_ptr() for p in model_ours.parameters()]
        results[name] = ({k: statistics.median(v) for k, v in timings.items()}, n, same_storage)
    if rank == 0:
        print(f"world size {world_size}, gloo on CPU, {args.iters} interleaved calls each, median ms per call")
        print(f"{'step':<15}{'params':>12}{'(a) floor':>12}{'(b) torch':>12}{'(c) ours':>12}{'c/a':>8}{'c/b':>8}")
        for name, (m, n, _) in results.items():
            print(f"{name:<15}{n:>12,}{m['a']:>12.2f}{m['b']:>12.2f}{m['c']:>12.2f}{m['c'] / m['a']:>8.2f}{m['c'] / m['b']:>8.2f}")
        reused = all(same for _, _, same in results.values())
        print(f"(c) kept every parameter in the same flat-buffer storage across all timed calls: {reused}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()

    port = free_port()
    mp.spawn(worker, args=(args.world_size, port, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
