"""Elastic hierarchical SGD on scikit-learn's digits, under torchrun.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1 --nproc-per-node=4 \\
        --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29400 --max-restarts=3 \\
        examples/train_digits.py --steps 300 --hierarchy 2:local,8:world

DDP with torch's post-local-SGD hook for warmup, then hierarchical parameter
averaging; checkpoints every ``--checkpoint-every`` steps to ``--checkpoint-url``
(any fsspec URL) and resumes from the newest one on every (re)start, at any
world size. Rank 0 prints JSON lines: ``started``/``resumed``, ``progress``,
``checkpoint`` and finally ``done`` with a hash of the final parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from elastic_hsgd import CheckpointManager, HierarchicalModelAverager
from elastic_hsgd.elastic import attach_post_local_sgd, init_distributed, resume

log = logging.getLogger("train_digits")


def parse_hierarchy(text: str) -> dict[int, int | str]:
    """``"2:local,8:world"`` -> ``{2: "local", 8: "world"}``."""
    levels: dict[int, int | str] = {}
    for part in text.split(","):
        try:
            period, size = part.split(":")
            levels[int(period)] = size if size in ("local", "world") else int(size)
        except ValueError:
            raise SystemExit(f"--hierarchy part {part!r} is not PERIOD:SIZE (SIZE an int, 'local' or 'world'), e.g. 2:local,8:world")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-url", default="checkpoints/digits", help="any fsspec URL or local folder")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--hierarchy", default="2:local,8:world", help="PERIOD:SIZE,... with SIZE an int, 'local' or 'world'")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--local-checkpoint-url", default=None, help="node-local folder (e.g. /dev/shm/ckpt), one per node; enables the local tier")
    p.add_argument("--local-checkpoint-every", type=int, default=None, help="local tier cadence in steps (with --local-checkpoint-url)")
    p.add_argument("--async-checkpoint", action="store_true", help="write checkpoints in the background")
    p.add_argument("--collective-timeout", type=float, default=30.0, help="seconds before a collective with a lost peer fails")
    p.add_argument("--step-delay", type=float, default=0.0, help="extra seconds per step (slows a demo down)")
    p.add_argument("--storage-options", default="{}", help="JSON passed to fsspec (e.g. an S3 endpoint)")
    return p.parse_args(argv)


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(12345))  # fixed split, not --seed
    test, train = order[:297], order[297:]
    return x[train], y[train], x[test], y[test]


def batch_indices(seed: int, step: int, rank: int, world_size: int, batch_size: int, n: int) -> torch.Tensor:
    """A function of (seed, step) alone, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (world_size * batch_size,), generator=g)[rank * batch_size : (rank + 1) * batch_size]


def test_accuracy(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, device: torch.device) -> float:
    """Accuracy of this rank's replica on the held-out split."""
    with torch.no_grad():
        return (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()


def params_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def print_json(event: dict) -> None:
    # One write per line: every rank shares the agent's stdout, and print()'s
    # separate newline write would let lines of different ranks interleave.
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def emit(rank: int, **event) -> None:
    if rank == 0:
        print_json(event)


def train(args, info, device, ddp, state, manager, start_step, progress, data) -> float:
    """Steps ``start_step .. args.steps - 1``; returns the last loss."""
    x_train, y_train, x_test, y_test = data
    model, optimizer, averager = state["model"], state["optimizer"], state["averager"]
    loss_fn = torch.nn.CrossEntropyLoss()
    loss = torch.tensor(float("nan"))
    for step in range(start_step, args.steps):
        idx = batch_indices(args.seed, step, info.rank, info.world_size, args.batch_size, len(x_train))
        xb, yb = x_train[idx].to(device), y_train[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(xb), yb)
        loss.backward()
        optimizer.step()
        averager.average_parameters(ddp.parameters())
        done = step + 1
        for tier in manager.maybe_save(done, state, final=done == args.steps):
            if tier == "cloud":
                emit(info.rank, event="checkpoint", step=done, world_size=info.world_size)
            else:  # staged now, committed in the background: `committed` is the newest local step done everywhere
                emit(info.rank, event="local_checkpoint", step=done, committed=manager.local_committed_step, world_size=info.world_size)
        if done % args.log_every == 0:
            emit(
                info.rank, event="progress", step=done, loss=round(loss.item(), 5),
                test_accuracy=round(test_accuracy(model, x_test, y_test, device), 4), world_size=info.world_size,
                local_committed=manager.local_committed_step,
            )
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", world=info.world_size)
        if args.step_delay:
            time.sleep(args.step_delay)
    return loss.item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s rank" + os.environ.get("RANK", "?") + " %(message)s", stream=sys.stderr)
    info = init_distributed(timeout=timedelta(seconds=args.collective_timeout))
    device = torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")
    print_json({"event": "worker", "rank": info.rank, "pid": os.getpid(), "world_size": info.world_size})

    x_train, y_train, x_test, y_test = load_data(args.seed)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, args.hidden), torch.nn.ReLU(), torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(), torch.nn.Linear(args.hidden, 10)
    ).to(device)
    ddp = DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    # Built for the current world: raises here, on every rank, if the hierarchy no longer fits.
    averager = HierarchicalModelAverager(parse_hierarchy(args.hierarchy), warmup_steps=args.warmup_steps)
    hook = attach_post_local_sgd(ddp, averager)
    manager = CheckpointManager(
        args.checkpoint_url, keep=args.keep, async_save=args.async_checkpoint, storage_options=json.loads(args.storage_options),
        every=args.checkpoint_every, local_url=args.local_checkpoint_url, local_every=args.local_checkpoint_every,
    )
    state = {"model": model, "optimizer": optimizer, "averager": averager, "post_local_sgd": hook}
    resumed = resume(manager, state, averager)
    hierarchy = [[lv.period, lv.group_size] for lv in averager.levels]
    if resumed.checkpoint is None:
        emit(info.rank, event="started", step=0, world_size=info.world_size, generation=resumed.generation, hierarchy=hierarchy)
    else:
        emit(
            info.rank, event="resumed", step=resumed.step, world_size=info.world_size,
            previous_world_size=resumed.previous_world_size, generation=resumed.generation, hierarchy=hierarchy,
            source=resumed.source,
        )

    progress = None
    quiet_logs = contextlib.nullcontext()
    if info.rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        progress = tqdm(total=args.steps, initial=resumed.step, desc="train", unit="step")
        quiet_logs = logging_redirect_tqdm()  # log lines above the bar, not through it
    with quiet_logs:
        loss = train(args, info, device, ddp, state, manager, resumed.step, progress, (x_train, y_train, x_test, y_test))
    manager.close()
    if progress is not None:
        progress.close()

    accuracy = test_accuracy(model, x_test, y_test, device)
    emit(
        info.rank, event="done", step=averager.step, world_size=info.world_size, loss=None if math.isnan(loss) else round(loss, 6),
        test_accuracy=round(accuracy, 4), params_sha256=params_sha256(model),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
