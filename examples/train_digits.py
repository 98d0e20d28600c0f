"""Elastic hierarchical SGD on scikit-learn's digits, under torchrun.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1 --nproc-per-node=4 \\
        --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29400 --max-restarts=3 \\
        examples/train_digits.py --steps 300 --hierarchy 2:2,8:world

DDP with torch's post-local-SGD hook for warmup, then hierarchical parameter
averaging (default ``--hierarchy 8:world``: one level, which fits one machine at
any world size; on several nodes ``2:local,8:world`` adds a level inside each
node); checkpoints every ``--checkpoint-every`` steps to ``--checkpoint-url``
(any fsspec URL) and resumes from the newest one on every (re)start, at any
world size. Rank 0 prints JSON lines: ``started``/``resumed``, ``progress``,
``checkpoint`` and finally ``done`` with a hash of the final parameters: the
world's mean, the same on every rank (the loop ends with ``averager.synchronize``
before the final save; with replica groups, with a committed cross-group sync).

Fault-tolerant replica groups (torchft) when ``TORCHFT_LIGHTHOUSE`` is set: start
``torchft_lighthouse --min_replicas 1 --bind [::]:29510`` once, then one torchrun
per replica group, each with its own rendezvous and ``--replica-group-id``
(default: env ``REPLICA_GROUP_ID``), and a hierarchy whose top level is
``replicas``, e.g. ``--hierarchy 2:local,8:world,32:replicas``, and every group
with the same heal secret (``ELASTIC_HSGD_HEAL_SECRET=$(openssl rand -hex 32)``,
or a file named by ``ELASTIC_HSGD_HEAL_SECRET_FILE``). A group that
(re)starts while others run heals from a live peer instead of reading the
checkpoint; only the first group of the quorum writes checkpoints. Extra lines:
``quorum`` (number of groups taking part changed) and ``healed``.

``--shard-size N`` shards each replica with FSDP2 instead of DDP, as
``examples/train_lm.py`` does: a ``(world / N, N)`` mesh over this job's ranks
(with replica groups, the group's own ranks), ``fully_shard`` on every linear
layer and on the model over its ``"shard"`` dim. The averager averages each
rank's shards with the ranks holding the same slice in the other replicas; on
the ``replicas`` level rank ``r`` exchanges its shards with rank ``r`` of the
other groups, and a restarted group heals shard by shard (rank ``r`` fetches
rank ``r``'s state). Every group must use the same ``--shard-size``: a heal
from a group sharded otherwise is refused. ``--hidden 15`` gives rows that
shard unevenly (8 + 7).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common import (
    add_job_arguments,
    add_outer_arguments,
    averager_options,
    announce,
    batch_indices,
    checkpoint_manager,
    emit,
    emit_ft_events,
    init_worker,
    outer_state_sha256,
    params_sha256,
    parse_hierarchy,
    progress_bar,
    train_loop,
)
from elastic_hsgd import HierarchicalModelAverager
from elastic_hsgd.elastic import Resumed, attach_post_local_sgd, resume
from elastic_hsgd.ft.env import check_replica_group_id, lighthouse_from_env

log = logging.getLogger("train_digits")

__all__ = ["batch_indices", "load_data", "main", "parse_args", "parse_hierarchy"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p, checkpoint_url="checkpoints/digits", steps=300, batch_size=32, lr=0.05)
    p.add_argument("--hidden", type=int, default=128)
    add_outer_arguments(p)
    p.add_argument("--replica-group-id", default=os.environ.get("REPLICA_GROUP_ID"), help="fault-tolerant mode: this replica group's id (default: env REPLICA_GROUP_ID)")
    p.add_argument("--ft-timeout", type=float, default=10.0, help="fault-tolerant mode: seconds before a sync with a lost replica group fails")
    p.add_argument(
        "--shard-size", type=int, default=0,
        help="shard each replica over this many ranks with FSDP2 (a (world/N, N) mesh of this job's ranks) instead of DDP; "
        "default 0: every rank holds a whole replica (DDP)",
    )
    args = p.parse_args(argv)
    if args.shard_size < 0:
        p.error(f"--shard-size {args.shard_size} must be a positive number of ranks (or 0 for DDP)")
    return args


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(12345))  # fixed split, not --seed
    test, train = order[:297], order[297:]
    return x[train], y[train], x[test], y[test]


def test_accuracy(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, device: torch.device) -> float:
    """Accuracy of this rank's replica on the held-out split."""
    with torch.no_grad():
        return (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()


def train(args, info, device, ddp, state, manager, start_step, progress, data, top=None) -> float:
    """Steps ``start_step .. args.steps - 1``; returns the last loss."""
    x_train, y_train, x_test, y_test = data
    model, optimizer = state["model"], state["optimizer"]
    loss_fn = torch.nn.CrossEntropyLoss()

    # Replica groups are data parallel too: each draws its own batches.
    data_seed = args.seed if top is None else args.seed + 7919 * args.replica_group_id

    def train_step(step: int) -> torch.Tensor:
        idx = batch_indices(data_seed, step, info.rank, info.world_size, args.batch_size, len(x_train))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x_train[idx].to(device)), y_train[idx].to(device))
        loss.backward()
        optimizer.step()
        return loss

    def metrics() -> dict:
        return {"test_accuracy": round(test_accuracy(model, x_test, y_test, device), 4)}

    return train_loop(args, info, state, manager, start_step, progress, train_step, metrics, top)


def shard(model: torch.nn.Sequential, shard_size: int, info, device: torch.device) -> torch.nn.Sequential:
    """``--shard-size``: FSDP2 over the ``"shard"`` dim of a ``(world / N, N)`` mesh, layer by layer. Collective.

    With replica groups the world is the group's: each group is ``world / N`` replicas of ``N`` shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if info.world_size % shard_size:
        raise SystemExit(f"--shard-size {shard_size} does not divide the world size {info.world_size}: use a divisor")
    mesh = init_device_mesh(device.type, (info.world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    return model


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info, device = init_worker(args.collective_timeout)

    x_train, y_train, x_test, y_test = load_data(args.seed)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, args.hidden), torch.nn.ReLU(), torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(), torch.nn.Linear(args.hidden, 10)
    ).to(device)
    if args.shard_size:
        ddp = model = shard(model, args.shard_size, info, device)  # FSDP2 averages a replica's gradients
    else:
        ddp = DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    fault_tolerant = lighthouse_from_env() is not None
    top = None
    if fault_tolerant:
        from elastic_hsgd.ft.replicas import ReplicaGroups

        args.replica_group_id = int(check_replica_group_id(args.replica_group_id))
        top = ReplicaGroups()  # its torchft Manager comes below: it needs the state, which holds the averager
    # Built for the current world: raises here, on every rank, if the hierarchy no longer fits
    # (or, with replica groups, if its top level is not "replicas").
    hierarchy = parse_hierarchy(args.hierarchy)
    averager = HierarchicalModelAverager(
        hierarchy, warmup_steps=args.warmup_steps, top_level=top, **averager_options(args, list(hierarchy))
    )
    # DDP stops all-reducing gradients after warmup (the hook, checkpointed); FSDP2 keeps averaging a replica's.
    hooks = {} if args.shard_size else {"post_local_sgd": attach_post_local_sgd(ddp, averager)}
    manager = checkpoint_manager(args)
    state = {"model": model, "optimizer": optimizer, "averager": averager, **hooks}
    joined = None
    if fault_tolerant:
        from elastic_hsgd.ft.wiring import join, make_manager, resume_group, sync_until_committed

        # Needs ELASTIC_HSGD_HEAL_SECRET (or _FILE); a healed group is reseeded from (seed, step, group, rank).
        make_manager(top, state, str(args.replica_group_id), timeout=timedelta(seconds=args.ft_timeout), seed=args.seed)
        joined = join(averager, ddp.parameters(), top)
        emit_ft_events(info, top, averager, args.replica_group_id, joined.heal)
    if joined is not None and joined.heal is not None:
        resumed = Resumed(joined.step, None, -1)  # healed from a peer (the "healed" line): the checkpoint is not read
        manager.continue_from(joined.step)  # the shared timeline at the peer's step: this group may write it next
    else:
        # Per-rank RNG after a fresh start or a world-size change (see elastic.resume); replica groups repeat
        # ranks and resume from one writer's files, so each group reseeds from (seed, step, group, rank).
        if top is None:
            resumed = resume(manager, state, averager, seed=args.seed)
        else:
            resumed = resume_group(manager, state, averager, replica_group=args.replica_group_id, seed=args.seed)
        announce(info, resumed, averager)
    with progress_bar(info, args.steps, resumed.step) as progress:
        loss = train(args, info, device, ddp, state, manager, resumed.step, progress, (x_train, y_train, x_test, y_test), top)
    if top is not None:
        # End on a cross-group sync: every group that finishes holds the same parameters.
        heal = sync_until_committed(averager, ddp.parameters(), top)
        emit_ft_events(info, top, averager, args.replica_group_id, heal)
        if top.is_checkpoint_writer():
            manager.save(args.steps, state)
            emit(info.rank, event="checkpoint", step=args.steps, world_size=info.world_size)
    manager.close()

    accuracy = test_accuracy(model, x_test, y_test, device)
    emit(
        info.rank, event="done", step=averager.step, world_size=info.world_size, loss=None if math.isnan(loss) else round(loss, 6),
        test_accuracy=round(accuracy, 4), params_sha256=params_sha256(model),
        **({} if averager.state_dict().get("outer") is None else {"outer_sha256": outer_state_sha256(averager)}),
        **({} if top is None else {
            "replica_group": args.replica_group_id, "cross_group_bytes_per_sync": top.cross_group_bytes_last_sync, "model_bytes": top.model_bytes,
        }),
    )
    if top is not None:
        top.manager.shutdown(wait=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
