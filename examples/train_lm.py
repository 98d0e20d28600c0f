"""Elastic hierarchical SGD on a small byte-level GPT, under torchrun.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1 --nproc-per-node=4 \\
        --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29400 --max-restarts=3 \\
        examples/train_lm.py --steps 600 --hierarchy 2:2,32:world

A decoder-only transformer (causal self-attention, ~1.8 M parameters by
default) learns to predict the next byte of real text that every machine has
without a download: the Python source of the installed standard library
(sorted paths, test folders and site-packages left out, the first
``--corpus-bytes`` bytes). Every ``--val-file-every``-th file is held out, so
validation text comes from files never trained on. The corpus's sha256 is in
the ``started``/``resumed`` event: two runs agree on their data iff it matches.

Flags, checkpoints, elastic resume and JSON events are the digits example's
(``examples/common.py``), the loop ending with ``averager.synchronize`` before the
final save; ``progress`` and ``done`` report ``val_loss`` in
nats per byte (ln 256 = 5.55 is a uniform guess). Training windows come from an
:class:`~elastic_hsgd.data.ElasticSampler` over every window start: one seeded
permutation per epoch, walked by the whole world one global batch at a time.
Its position is checkpointed, so a resumed run is bit-identical and a resume
at another world size (4 -> 2 -> 4) continues at the same global position.

``--shard-size N`` shards each replica with FSDP2 instead of DDP: a
``(world / N, N)`` device mesh, ``fully_shard`` on every block and on the model
over its ``"shard"`` dim. Each rank trains on its own batches (FSDP2 averages
the gradients of a replica's N ranks every step) and the averager averages each
rank's shards with the ranks holding the same slice in the other replicas; group
sizes still count ranks, so a level must span several replicas (a multiple of
N ranks). Checkpoints hold each rank's shards; everything else is as above.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from common import add_job_arguments, add_outer_arguments, announce, averager_options, batch_indices, checkpoint_manager, emit, init_worker, params_sha256, parse_hierarchy, progress_bar, train_loop
from elastic_hsgd import HierarchicalModelAverager
from elastic_hsgd.data import ElasticSampler
from elastic_hsgd.elastic import attach_post_local_sgd, resume

log = logging.getLogger("train_lm")

VOCAB = 256  # bytes
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p, checkpoint_url="checkpoints/lm", steps=600, batch_size=16, lr=2e-3)
    p.add_argument("--lr-warmup-steps", type=int, default=20, help="linear learning-rate warmup, then cosine decay to 10%%")
    p.add_argument("--context", type=int, default=64, help="bytes per training window")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000, help="bytes of standard-library source to use")
    p.add_argument("--val-file-every", type=int, default=10, help="every N-th file (sorted) is held out")
    p.add_argument("--val-windows", type=int, default=64, help="validation windows of --context bytes")
    p.add_argument(
        "--gradient-group", default="",
        help="after warmup, all-reduce gradients every step within blocks of this many ranks ('local': a node), "
        "below the hierarchy's lowest level; default: none (gradients stay local)",
    )
    p.add_argument(
        "--shard-size", type=int, default=0,
        help="shard each replica over this many ranks with FSDP2 (a (world/N, N) mesh) instead of DDP; "
        "default 0: every rank holds a whole replica (DDP)",
    )
    add_outer_arguments(p)
    args = p.parse_args(argv)
    if args.shard_size < 0:
        p.error(f"--shard-size {args.shard_size} must be a positive number of ranks (or 0 for DDP)")
    if args.shard_size and args.gradient_group:
        p.error("--gradient-group all-reduces DDP gradients; with --shard-size FSDP2 already averages a replica's gradients: drop one")
    if args.width % args.heads:
        p.error(f"--width {args.width} is not divisible by --heads {args.heads}: pick a width that is a multiple of the heads")
    if args.val_file_every < 2:
        p.error(f"--val-file-every {args.val_file_every} must be >= 2 (1 would hold out every file)")
    return args


# ---------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """Training and held-out bytes, split by file."""

    train: torch.Tensor  # uint8
    val: torch.Tensor  # uint8
    sha256: str
    files: int
    val_files: int
    root: str


def source_files(root: Path) -> list[Path]:
    """``*.py`` under ``root`` in sorted order, test folders and installed packages left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def load_corpus(budget_bytes: int, val_file_every: int = 10, root: str | None = None) -> Corpus:
    """The first ``budget_bytes`` of the sorted source files; every ``val_file_every``-th file held out.

    The sha256 covers each file's relative path and the bytes used, in order.
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if budget_bytes <= 0:
        raise ValueError(f"corpus budget {budget_bytes} bytes must be positive, e.g. 2000000")
    train, val, digest = [], [], hashlib.sha256()
    used = files = val_files = 0
    for index, path in enumerate(source_files(base)):
        if used >= budget_bytes:
            break
        data = path.read_bytes()[: budget_bytes - used]
        used += len(data)
        files += 1
        digest.update(path.relative_to(base).as_posix().encode() + b"\0" + data + b"\0")
        if index % val_file_every == val_file_every - 1:
            val.append(data)
            val_files += 1
        else:
            train.append(data)
    if used < budget_bytes:
        log.warning("only %d bytes of *.py under %s (asked for %d)", used, base, budget_bytes)
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(val), digest.hexdigest(), files, val_files, str(base))


def lm_windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-byte targets), ``len(starts) x context`` each, of the windows beginning at ``starts``."""
    windows = data[starts[:, None] + torch.arange(context + 1)].long()
    return windows[:, :-1], windows[:, 1:]


def lm_batch(data: torch.Tensor, seed: int, step: int, rank: int, world_size: int, batch_size: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (inputs, next-byte targets), ``batch_size x context`` each: independent random windows,
    a pure function of its arguments (``bench/convergence.py``'s batches; the job uses :func:`window_sampler`)."""
    return lm_windows(data, batch_indices(seed, step, rank, world_size, batch_size, len(data) - context), context)


def window_sampler(data: torch.Tensor, context: int, batch_size: int, seed: int, rank: int, world_size: int) -> ElasticSampler:
    """The job's batches: every window start of ``data`` (``len(data) - context`` of them) in one
    seeded order per epoch, ``batch_size`` per rank per step; checkpoint it as a state entry."""
    return ElasticSampler(len(data) - context, batch_size, seed=seed, rank=rank, world_size=world_size)


def endless(sampler: ElasticSampler):
    """The sampler's batches, epoch after epoch (each pass starts at the sampler's current state)."""
    while True:
        yield from sampler


def val_windows(data: torch.Tensor, count: int, context: int) -> torch.Tensor:
    """``count`` fixed windows of ``context + 1`` bytes spread evenly over the held-out text."""
    if len(data) < context + 1:
        raise ValueError(f"held-out text has {len(data)} bytes, fewer than --context {context} + 1: raise --corpus-bytes")
    starts = torch.linspace(0, len(data) - context - 1, count).long().unique()
    return data[starts[:, None] + torch.arange(context + 1)].long()


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class GPTConfig:
    context: int = 64
    width: int = 192
    layers: int = 4
    heads: int = 4


class Block(torch.nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = torch.nn.LayerNorm(cfg.width)
        self.qkv = torch.nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = torch.nn.Linear(cfg.width, cfg.width)
        self.norm2 = torch.nn.LayerNorm(cfg.width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(cfg.width, 4 * cfg.width), torch.nn.GELU(), torch.nn.Linear(4 * cfg.width, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class TinyGPT(torch.nn.Module):
    """Byte-level decoder; the output layer shares the byte embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Embedding(VOCAB, cfg.width)
        self.position = torch.nn.Embedding(cfg.context, cfg.width)
        self.blocks = torch.nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = torch.nn.LayerNorm(cfg.width)
        for module in self.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per byte."""
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def val_loss(model: torch.nn.Module, windows: torch.Tensor, device: torch.device, batch: int = 32) -> float:
    """Nats per byte of this rank's replica on the held-out windows."""
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(batch):
            chunk = chunk.to(device)
            total += lm_loss(model, chunk[:, :-1], chunk[:, 1:]).item() * len(chunk)
    return total / len(windows)


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------- job


def train(args, info, device, ddp, state, manager, start_step, progress, corpus: Corpus, held_out: torch.Tensor) -> float:
    """Steps ``start_step .. args.steps - 1``; returns the last loss."""
    model, optimizer = state["model"], state["optimizer"]
    # One batch per step, counted as it is drawn: the sampler's state saved after a step is the
    # position of the next step's batch (no prefetching loader in between, so no track()).
    batches = endless(state["data"])

    def train_step(step: int) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.lr_warmup_steps)
        inputs, targets = lm_windows(corpus.train, torch.tensor(next(batches)), args.context)
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(ddp, inputs.to(device), targets.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    def metrics() -> dict:
        return {"val_loss": round(val_loss(model, held_out, device), 5)}

    return train_loop(args, info, state, manager, start_step, progress, train_step, metrics)


def build_model(args: argparse.Namespace, device: torch.device) -> TinyGPT:
    torch.manual_seed(args.seed)
    return TinyGPT(GPTConfig(context=args.context, width=args.width, layers=args.layers, heads=args.heads)).to(device)


def gradient_group(spec: str, info) -> dist.ProcessGroup | None:
    """``--gradient-group``: this rank's block of ranks for per-step gradient all-reduce. Collective."""
    if not spec:
        return None
    try:
        size = info.local_world_size if spec == "local" else int(spec)
    except ValueError:
        raise SystemExit(f"--gradient-group {spec!r} is not an int or 'local', e.g. --gradient-group local")
    if size <= 0 or info.world_size % size:
        raise SystemExit(f"--gradient-group {size} does not divide the world size {info.world_size}: use a divisor or 'local'")
    return dist.new_subgroups(size)[0]


def shard(model: TinyGPT, shard_size: int, info, device: torch.device) -> TinyGPT:
    """``--shard-size``: FSDP2 over the ``"shard"`` dim of a ``(world / N, N)`` mesh, block by block. Collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if info.world_size % shard_size:
        raise SystemExit(f"--shard-size {shard_size} does not divide the world size {info.world_size}: use a divisor")
    mesh = init_device_mesh(device.type, (info.world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    return model


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info, device = init_worker(args.collective_timeout)

    corpus = load_corpus(args.corpus_bytes, args.val_file_every)
    held_out = val_windows(corpus.val, args.val_windows, args.context)
    model = build_model(args, device)
    if args.shard_size:
        ddp = model = shard(model, args.shard_size, info, device)  # FSDP2 averages a replica's gradients
    else:
        ddp = DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    # Built for the current world: raises here, on every rank, if the hierarchy no longer fits.
    hierarchy = parse_hierarchy(args.hierarchy)
    averager = HierarchicalModelAverager(hierarchy, warmup_steps=args.warmup_steps, **averager_options(args, list(hierarchy)))
    manager = checkpoint_manager(args)
    sampler = window_sampler(corpus.train, args.context, args.batch_size, args.seed, info.rank, info.world_size)
    # DDP stops all-reducing gradients after warmup (the hook, checkpointed); FSDP2 keeps averaging a replica's.
    hooks = {} if args.shard_size else {"post_local_sgd": attach_post_local_sgd(ddp, averager, subgroup=gradient_group(args.gradient_group, info))}
    state = {"model": model, "optimizer": optimizer, "averager": averager, **hooks, "data": sampler}
    resumed = resume(manager, state, averager, seed=args.seed)  # per-rank RNG after a fresh start or a world change
    announce(
        info, resumed, averager, corpus_sha256=corpus.sha256, corpus_files=corpus.files, val_files=corpus.val_files,
        train_bytes=len(corpus.train), val_bytes=len(corpus.val), parameters=sum(p.numel() for p in model.parameters()),
    )
    with progress_bar(info, args.steps, resumed.step) as progress:
        loss = train(args, info, device, ddp, state, manager, resumed.step, progress, corpus, held_out)
    manager.close()

    emit(
        info.rank, event="done", step=averager.step, world_size=info.world_size, loss=None if math.isnan(loss) else round(loss, 6),
        val_loss=round(val_loss(model, held_out, device), 5), params_sha256=params_sha256(model),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
