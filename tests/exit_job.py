"""A tiny torchrun worker for the clean-exit test: DDP + averager + checkpoints, then exit.

Flags: --url URL, --steps N, --async (background saves), --close (call
manager.close()), --destroy (call dist.destroy_process_group()).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from elastic_hsgd import CheckpointManager, HierarchicalModelAverager
from elastic_hsgd.elastic import attach_post_local_sgd, init_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--async", dest="async_save", action="store_true")
    parser.add_argument("--close", action="store_true")
    parser.add_argument("--destroy", action="store_true")
    args = parser.parse_args()

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    averager = HierarchicalModelAverager({2: 1, 4: "world"}, warmup_steps=1)
    counter = attach_post_local_sgd(ddp, averager)
    manager = CheckpointManager(args.url, keep=2, async_save=args.async_save)
    state = {"model": model, "optimizer": optimizer, "averager": averager, "post_local_sgd": counter}
    start = manager.load_latest(state) or 0
    for step in range(start, start + args.steps):
        optimizer.zero_grad()
        ddp(torch.randn(8, 4)).sum().backward()
        optimizer.step()
        averager.average_parameters(ddp.parameters())
        manager.save(step + 1, state)
    if args.close:
        manager.close()
    if args.destroy:
        dist.destroy_process_group()
    sys.stdout.write("exit-job done\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
