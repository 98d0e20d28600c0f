"""The averager on CUDA tensors: correctness and cost against a bare all_reduce.

    python bench/gpu_check.py [--params 10_000_000] [--iters 50]

1. NCCL at world size 1 (NCCL refuses two ranks on one GPU): averaging must
   leave values and dtypes as they are, and its cost is compared with a bare
   NCCL all_reduce of the same bytes.
2. gloo with 4 processes sharing one GPU, CUDA tensors: ranks fill their
   parameters with their rank, and after a global step every parameter must
   equal the mean (1.5); cost against a bare gloo all_reduce of the same bytes.

Each for plain averaging, a bf16 level, an int8 level, and a bf16 level with an outer
Nesterov step and anchors in pinned host memory (``anchor_device="cpu"``).
Prints median ms per call and the ratio ours / bare. Exits 0 with a message
where CUDA is absent.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from elastic_hsgd import HierarchicalModelAverager  # noqa: E402
from tests.distributed import free_port  # noqa: E402


def make_model(n_params: int) -> torch.nn.Module:
    width = 1024
    layers = max(1, round(n_params / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).cuda()
    model.append(torch.nn.Linear(width, 8).cuda().half())  # a second dtype, kept as is
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def timed(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compare(model, averager, iters: int) -> tuple[float, float]:
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    bare = timed(lambda: dist.all_reduce(flat), iters)
    ours = timed(lambda: averager.average_parameters(model.parameters()), iters)
    return bare, ours


VARIANTS = {
    "plain": {},
    "bf16 level": {"comm_dtypes": {1: torch.bfloat16}},
    "int8 level": {"comm_dtypes": {1: torch.int8}},
    "bf16 + outer Nesterov, anchors on host": {
        "comm_dtypes": {1: torch.bfloat16},
        "outer_optimizers": {1: functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)},
        "anchor_device": "cpu",
    },
}


def worker(rank: int, world: int, port: int, backend: str, variant: str, args: argparse.Namespace, results) -> None:
    try:
        torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        model = make_model(args.params)
        # The first call starts any anchors at the mean and syncs: values must be the mean either way.
        averager = HierarchicalModelAverager({1: "world"}, **VARIANTS[variant])
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(rank))
        before = [p.detach().clone() for p in model.parameters()]
        averager.average_parameters(model.parameters())
        expected = sum(range(world)) / world
        ok = all(p.dtype == b.dtype and p.is_cuda and torch.allclose(p.float(), torch.full_like(p.float(), expected)) for p, b in zip(model.parameters(), before))
        bare, ours = compare(model, averager, args.iters)
        if rank == 0:
            results.put((backend, world, ok, bare, ours, sum(p.numel() for p in model.parameters())))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001
        results.put((backend, world, False, float("nan"), float("nan"), repr(exc)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available here: nothing to check. Run this on a machine with an NVIDIA GPU.")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    ctx = mp.get_context("spawn")
    failed = False
    for backend, world, variant in [(b, w, v) for b, w in (("nccl", 1), ("gloo", 4)) for v in VARIANTS]:
        results = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, backend, variant, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        backend, world, ok, bare, ours, n = results.get(timeout=600)
        for p in procs:
            p.join(timeout=60)
        failed |= not ok
        print(
            f"{backend} world {world}, {variant}: values {'OK' if ok else 'WRONG'}, params {n:,}, "
            f"bare all_reduce {bare:.3f} ms, ours {ours:.3f} ms, ours/bare {ours / bare:.2f}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
