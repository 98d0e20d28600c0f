"""What the example jobs share: flags, JSON events, batch selection, the training loop.

Each example (``train_digits.py``, ``train_lm.py``) brings its model, data and
loss; this module runs the rest the same way for both: process group, events
on rank 0, resume, periodic checkpoints, the progress bar, the final hash.

    >>> from common import batch_indices
    >>> batch_indices(seed=0, step=3, rank=1, world_size=2, batch_size=4, n=100).tolist() == \\
    ...     batch_indices(0, 3, 1, 2, 4, 100).tolist()
    True
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch

from elastic_hsgd import CheckpointManager, HierarchicalModelAverager
from elastic_hsgd.elastic import Resumed, WorkerInfo, init_distributed


def parse_hierarchy(text: str) -> dict[int, int | str]:
    """``"2:local,8:world"`` -> ``{2: "local", 8: "world"}``."""
    levels: dict[int, int | str] = {}
    for part in text.split(","):
        try:
            period, size = part.split(":")
            levels[int(period)] = size if size in ("local", "world", "replicas") else int(size)
        except ValueError:
            raise SystemExit(
                f"--hierarchy part {part!r} is not PERIOD:SIZE (SIZE an int, 'local', 'world' or 'replicas'), e.g. 2:local,8:world"
            )
    return levels


# One level that fits any world on one machine: there "local" is the whole world, so a
# "local" level below "world" would average the same group twice (the averager warns).
DEFAULT_HIERARCHY = "8:world"


def add_job_arguments(p: argparse.ArgumentParser, *, checkpoint_url: str, steps: int, batch_size: int, lr: float) -> None:
    """The flags every example job has (checkpointing, hierarchy, schedule, fault handling)."""
    p.add_argument("--checkpoint-url", default=checkpoint_url, help="any fsspec URL or local folder")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument(
        "--hierarchy", default=DEFAULT_HIERARCHY,
        help=f"PERIOD:SIZE,... with SIZE an int, 'local' or 'world' (default {DEFAULT_HIERARCHY}: the whole world every "
        "8 steps, which fits one machine at any world size; on several nodes add a node level, e.g. 2:local,8:world, "
        "and on one node a subgroup level, e.g. 2:2,8:world)",
    )
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=batch_size, help="per worker")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--local-checkpoint-url", default=None, help="node-local folder (e.g. /dev/shm/ckpt), one per node; enables the local tier")
    p.add_argument("--local-checkpoint-every", type=int, default=None, help="local tier cadence in steps (with --local-checkpoint-url)")
    p.add_argument("--async-checkpoint", action="store_true", help="write checkpoints in the background")
    p.add_argument("--collective-timeout", type=float, default=30.0, help="seconds before a collective with a lost peer fails")
    p.add_argument("--step-delay", type=float, default=0.0, help="extra seconds per step (slows a demo down)")
    p.add_argument("--storage-options", default="{}", help="JSON passed to fsspec (e.g. an S3 endpoint)")


def checkpoint_manager(args: argparse.Namespace) -> CheckpointManager:
    """The job's CheckpointManager: cloud tier every ``--checkpoint-every`` steps, the
    node-local tier every ``--local-checkpoint-every`` steps when ``--local-checkpoint-url`` is set."""
    return CheckpointManager(
        args.checkpoint_url, keep=args.keep, async_save=args.async_checkpoint, storage_options=json.loads(args.storage_options),
        every=args.checkpoint_every, local_url=args.local_checkpoint_url, local_every=args.local_checkpoint_every,
    )


WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def add_outer_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for hierarchical DiLoCo: outer optimizers and a compressed top level."""
    diloco = p.add_argument_group("hierarchical DiLoCo (outer optimizers on averaging levels)")
    diloco.add_argument(
        "--outer-levels", choices=("none", "top", "all"), default="none",
        help="levels whose sync is an outer Nesterov SGD step on the averaged pseudo-gradient instead of "
        "plain parameter averaging: none (default, torch's averaging), the top level only, or every level",
    )
    diloco.add_argument("--outer-lr", type=float, default=0.7, help="outer SGD learning rate (DiLoCo: 0.7)")
    diloco.add_argument("--outer-momentum", type=float, default=0.9, help="outer SGD Nesterov momentum (DiLoCo: 0.9)")
    diloco.add_argument(
        "--comm-dtype", choices=("fp32", "bf16", "fp16", "int8"), default="fp32",
        help="dtype the top level sends its pseudo-gradient in (summed in fp32); bf16/fp16 halve its bytes, "
        "int8 (per-row scales) quarters them",
    )
    diloco.add_argument(
        "--sync-delay", type=int, default=0,
        help="overlap the top level's sync with this many training steps (sync_delays={top: N}; Streaming DiLoCo's "
        "delay): its all-reduce runs in the background and lands N steps later; 0 (default): synchronous",
    )
    diloco.add_argument(
        "--anchor-device", default=None,
        help="where anchors and outer-optimizer state live, e.g. 'cpu' to keep them in pinned host memory on GPU jobs",
    )


def averager_options(args: argparse.Namespace, periods: list[int]) -> dict[str, Any]:
    """``outer_optimizers`` / ``comm_dtypes`` / ``sync_delays`` / ``anchor_device`` for the averager from those flags."""
    import functools

    top = max(periods)
    outer_periods = {"none": [], "top": [top], "all": periods}[args.outer_levels]
    # foreach: on CPU torch defaults to its per-tensor loop, which allocates a temporary the size of
    # the anchor every Nesterov step and takes about 2.5x longer on a 10 M-parameter anchor.
    nesterov = functools.partial(torch.optim.SGD, lr=args.outer_lr, momentum=args.outer_momentum, nesterov=True, foreach=True)
    options = {
        "outer_optimizers": {period: nesterov for period in outer_periods},
        "comm_dtypes": {top: WIRE_DTYPES[args.comm_dtype]} if args.comm_dtype in WIRE_DTYPES else {},
        "anchor_device": args.anchor_device,
    }
    if args.sync_delay:  # the averager checks the value (>= 0, below the top period)
        options["sync_delays"] = {top: args.sync_delay}
    return options


def batch_indices(seed: int, step: int, rank: int, world_size: int, batch_size: int, n: int) -> torch.Tensor:
    """Indices in ``range(n)`` for this rank's batch: a function of (seed, step, rank, world) alone,
    so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (world_size * batch_size,), generator=g)[rank * batch_size : (rank + 1) * batch_size]


def params_sha256(model: torch.nn.Module) -> str:
    """Digest of the model's parameters by name; sharded (DTensor) ones as full tensors (collective then)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(whole.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def outer_state_sha256(averager: HierarchicalModelAverager) -> str | None:
    """Digest of the averager's anchors and outer-optimizer state (``None`` without anchored levels).

    Equal on two ranks of the same group position means the same anchors and momentum: what
    a heal must carry for hierarchical DiLoCo to go on as if nothing happened.
    """
    outer_state = averager.state_dict().get("outer")
    if outer_state is None:
        return None
    h = hashlib.sha256()

    def feed(value: object) -> None:
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        else:
            h.update(repr(value).encode())

    feed(outer_state)
    return h.hexdigest()


def print_json(event: dict) -> None:
    # One write per line: every rank shares the agent's stdout, and print()'s
    # separate newline write would let lines of different ranks interleave.
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def emit(rank: int, **event: Any) -> None:
    if rank == 0:
        print_json(event)


def init_worker(collective_timeout: float) -> tuple[WorkerInfo, torch.device]:
    """Logging, the process group, and the ``worker`` event (every rank: tests kill workers by pid)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s rank" + os.environ.get("RANK", "?") + " %(message)s", stream=sys.stderr)
    info = init_distributed(timeout=timedelta(seconds=collective_timeout))
    device = torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")
    print_json({"event": "worker", "rank": info.rank, "pid": os.getpid(), "world_size": info.world_size})
    return info, device


def announce(info: WorkerInfo, resumed: Resumed, averager: Any, **extra: Any) -> None:
    """The ``started`` or ``resumed`` event, with the hierarchy resolved for this world."""
    hierarchy = [[lv.period, lv.group_size] for lv in averager.levels]
    if resumed.checkpoint is None:  # a step-0 checkpoint is a resume
        emit(info.rank, event="started", step=0, world_size=info.world_size, generation=resumed.generation, hierarchy=hierarchy, **extra)
    else:
        emit(
            info.rank, event="resumed", step=resumed.step, world_size=info.world_size,
            previous_world_size=resumed.previous_world_size, generation=resumed.generation, hierarchy=hierarchy,
            source=resumed.source, **extra,
        )


@contextlib.contextmanager
def progress_bar(info: WorkerInfo, total: int, initial: int) -> Iterator[Any]:
    """A tqdm bar on rank 0 when stderr is a terminal (log lines go above it), else ``None``."""
    if info.rank != 0 or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with tqdm(total=total, initial=initial, desc="train", unit="step") as bar, logging_redirect_tqdm():
        yield bar


def emit_ft_events(info: WorkerInfo, top: Any, averager: Any, replica_group: Any, heal: Any = None) -> None:
    """Quorum changes and heals of the replicas level, as JSON lines (fault-tolerant mode only)."""
    if top is None:
        return
    for event in top.take_events():
        emit(info.rank, **event, replica_group=replica_group)
    heal = heal or top.take_heal()
    if heal is not None:
        emit(
            info.rank, event="healed", step=averager.step, source_replica=int(heal.source_replica), seconds=round(heal.seconds, 4),
            bytes=heal.bytes, replica_group=replica_group,
        )


def train_loop(
    args: argparse.Namespace,
    info: WorkerInfo,
    state: dict[str, Any],
    manager: Any,
    start_step: int,
    progress: Any,
    train_step: Callable[[int], torch.Tensor],
    metrics: Callable[[], dict[str, Any]],
    top: Any = None,
) -> float:
    """Steps ``start_step .. args.steps - 1``; returns the last loss.

    ``train_step(step)`` runs forward, backward and the optimizer step and
    returns the loss; then the averager averages ``state["model"]``, a
    checkpoint is saved every ``args.checkpoint_every`` steps (and at the end, after
    ``averager.synchronize``; the local tier at its own cadence),
    and every ``args.log_every`` steps a ``progress`` event carries the loss and
    ``metrics()``.

    With ``top`` (fault-tolerant replica groups, :mod:`elastic_hsgd.ft`), its
    ``quorum``/``healed`` lines follow each step, only the first group of the
    quorum writes checkpoints, and the last one is left to the caller (after
    the final cross-group sync).
    """
    model, averager = state["model"], state["averager"]
    loss = torch.tensor(float("nan"))
    for step in range(start_step, args.steps):
        loss = train_step(step)
        averager.average_parameters(model.parameters())
        emit_ft_events(info, top, averager, getattr(args, "replica_group_id", None))
        done = step + 1
        if done == args.steps and top is None:
            # Between averaging points every rank holds its own replica: end on the world's mean, so the
            # final checkpoint and the `done` line's params_sha256 are the same on every rank.
            averager.synchronize(model.parameters())
        # With replica groups one group writes (the first of the quorum), and the
        # last checkpoint comes after the final cross-group sync (the caller's).
        writer = top is None or top.is_checkpoint_writer()
        if writer and not (top is not None and done == args.steps):
            for tier in manager.maybe_save(done, state, final=done == args.steps):
                if tier == "cloud":
                    emit(info.rank, event="checkpoint", step=done, world_size=info.world_size)
                else:  # staged now, committed in the background: `committed` is the newest local step done everywhere
                    emit(info.rank, event="local_checkpoint", step=done, committed=manager.local_committed_step, world_size=info.world_size)
        if done % args.log_every == 0:
            emit(
                info.rank, event="progress", step=done, loss=round(loss.item(), 5), **metrics(), world_size=info.world_size,
                local_committed=manager.local_committed_step,
            )
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", world=info.world_size)
        if args.step_delay:
            time.sleep(args.step_delay)
    return loss.item()
