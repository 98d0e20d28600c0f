"""Quality versus global traffic: DDP, post-local SGD and hierarchical SGD, side by side.

    python bench/convergence.py [--seeds 0 1 2] [--steps 641] [--out docs]            # digits
    python bench/convergence.py --task lm [--seeds 0 1 2] [--out docs]                 # byte-level GPT

``--task digits`` (default): `--world-size` gloo workers on this machine (4 by default),
scikit-learn's digits with a fixed held-out test split, the same MLP, seeds, learning-rate
schedule and number of steps for:

(a) DDP: gradients all-reduced over the world every step;
(b) post-local SGD, one level: torch's ``PeriodicModelAverager`` (period 8);
(c) elastic_hsgd's averager, two levels {2: 2, 16: world};
(d) elastic_hsgd's averager, three levels: {2: 2, 16: 4, 32: 4} at 4 workers (where
    a third level can only repeat a group size, as in torch's own tests), and
    {2: 2, 8: 4, 32: world} with ``--world-size 8``;
(e)-(h) hierarchical DiLoCo {2:2, 64:world} (top period 4x (c)'s): outer Nesterov SGD (lr 0.7,
    momentum 0.9) on the top level or on both, each with and without bf16 on the top level;
(i) torchft's ``DiLoCo`` every 64 steps (same outer optimizer, no warmup), each worker its own
    replica group under torchft's real lighthouse and Manager (``bench/torchft_peer.py``);
(j), (k) (f) and (h) with a milder outer optimizer (lr 1.0, momentum 0.5); (l), (m) the same
    with int8 (per-row scales) instead of bf16 on the top level.

``--task lm``: 8 workers by default, ``examples/train_lm.py``'s byte-level GPT (0.25 M
parameters by default, to fit a 2-core machine; ``--width``/``--layers`` for more) on the installed standard library's Python source, validation loss in nats per
byte on held-out files, AdamW, the same token budget for every row (steps x workers x batch x
context), rows from :func:`lm_rows`: DDP, post-local SGD (period 16), hierarchical SGD with two
levels (gradients all-reduced within a node of 4 every step, parameters averaged over the world
every 32 steps) and three levels (gradients within pairs every step, parameters within nodes of 4
every 4 steps and over the world every 32 or 64); hierarchical DiLoCo (the two-level row with an
outer Nesterov step, lr 1.0 momentum 0.5, on the world level and its pseudo-gradient sent in bf16);
torchft's ``DiLoCo`` every 32 steps as a peer (its recipe, outer lr 0.7 momentum 0.9).

The post-local-SGD rows run torch's post-local-SGD hook: global gradient all-reduce for the
first ``--warmup`` steps, local steps after. Every ``dist.all_reduce`` is counted (bytes per
rank, by whether its group spans the world), DDP's included (it runs through the equivalent
allreduce comm hook), and so is every ``dist.all_to_all_single`` of a compressed (bf16, int8) level;
torchft's rows count the bytes its Manager all-reduces. Writes a markdown table and a PNG of the metric versus global bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from elastic_hsgd import HierarchicalModelAverager  # noqa: E402
from tests.distributed import free_port  # noqa: E402
from elastic_hsgd.elastic import attach_post_local_sgd  # noqa: E402
from common import batch_indices  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One configuration: how gradients and parameters are communicated.

    ``kind`` is ``"ddp"``, ``"periodic"`` (torch's one-level averager, ``period``) or
    ``"hierarchical"`` (ours, ``hierarchy``; ``averager_kwargs(params)`` adds constructor
    arguments built from the model's parameters; ``hook_subgroup`` > 0 all-reduces gradients every
    step within blocks of that many ranks, below the averager's levels, as torch's post-local-SGD
    hook does with a subgroup). A row with ``pending`` set is listed, not run.
    """

    name: str
    kind: str
    period: int = 0
    hierarchy: dict = field(default_factory=dict)
    averager_kwargs: Callable[[list[torch.nn.Parameter]], dict] | None = None
    hook_subgroup: int = 0
    pending: str = ""
    shard_size: int = 0  # > 0: FSDP2 over blocks of this many ranks instead of DDP (the averager gets DTensors)


def hierarchy_name(levels: dict) -> str:
    return "{" + ", ".join(f"{p}:{s}" for p, s in levels.items()) + "}"


def digits_rows(world: int) -> list[Row]:
    three = {2: 2, 16: 4, 32: 4} if world < 8 else {2: 2, 8: 4, 32: "world"}
    return [
        Row("(a) DDP", "ddp"),
        Row("(b) post-local SGD, period 8", "periodic", period=8),
        Row("(c) hierarchical {2:2, 16:world}", "hierarchical", hierarchy={2: 2, 16: "world"}),
        Row(f"(d) hierarchical {hierarchy_name(three)}", "hierarchical", hierarchy=three),
        *diloco_rows(),
    ]


DILOCO_TOP = 64  # 4x the top period of digits' (c)


def outer_kwargs(
    outer_periods: list[int], wire_dtype: bool | torch.dtype, lr: float = 0.7, momentum: float = 0.9, top: int = DILOCO_TOP,
    delay: int = 0,
) -> Callable[[list], dict]:
    """Averager arguments for hierarchical DiLoCo: outer Nesterov SGD on ``outer_periods``, and level
    ``top``'s pseudo-gradient sent in ``wire_dtype`` (``True``: bf16; ``False``: fp32), its sync
    overlapped by ``delay`` steps (``sync_delays``; 0: synchronous)."""
    import functools

    nesterov = functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=True)
    dtype = torch.bfloat16 if wire_dtype is True else wire_dtype
    wire = {top: dtype} if dtype else {}
    delays = {"sync_delays": {top: delay}} if delay else {}
    return lambda params: {"outer_optimizers": {p: nesterov for p in outer_periods}, "comm_dtypes": wire, **delays}


def diloco_rows() -> list[Row]:
    """Hierarchical DiLoCo at a top period 4x (c)'s, and torchft's DiLoCo as a peer."""
    h, top, both = {2: 2, DILOCO_TOP: "world"}, [DILOCO_TOP], [2, DILOCO_TOP]
    name = f"{{2:2, {DILOCO_TOP}:world}}"
    return [
        Row(f"(e) DiLoCo top {name}", "hierarchical", hierarchy=h, averager_kwargs=outer_kwargs(top, False)),
        Row(f"(f) DiLoCo top {name}, bf16", "hierarchical", hierarchy=h, averager_kwargs=outer_kwargs(top, True)),
        Row(f"(g) DiLoCo every level {name}", "hierarchical", hierarchy=h, averager_kwargs=outer_kwargs(both, False)),
        Row(f"(h) DiLoCo every level {name}, bf16", "hierarchical", hierarchy=h, averager_kwargs=outer_kwargs(both, True)),
        Row(f"(i) torchft DiLoCo, every {DILOCO_TOP}", "torchft", period=DILOCO_TOP),
        # A milder outer optimizer, found by a 4-setting sweep on seeds 0-1.
        Row(f"(j) DiLoCo top {name}, bf16, outer lr 1.0 m 0.5", "hierarchical", hierarchy=h, averager_kwargs=outer_kwargs(top, True, 1.0, 0.5)),
        Row(f"(k) DiLoCo every level {name}, bf16, outer lr 1.0 m 0.5", "hierarchical", hierarchy=h, averager_kwargs=outer_kwargs(both, True, 1.0, 0.5)),
        Row(f"(l) DiLoCo top {name}, int8, outer lr 1.0 m 0.5", "hierarchical", hierarchy=h, averager_kwargs=outer_kwargs(top, torch.int8, 1.0, 0.5)),
        Row(f"(m) DiLoCo every level {name}, int8, outer lr 1.0 m 0.5", "hierarchical", hierarchy=h, averager_kwargs=outer_kwargs(both, torch.int8, 1.0, 0.5)),
    ]


def lm_rows(world: int) -> list[Row]:
    """Adding a configuration is one entry here. A "node" is 4 ranks (2 below 8 workers)."""
    node = 4 if world >= 8 else 2
    pair = 2 if node > 2 else 1
    return [
        Row("(a) DDP", "ddp"),
        Row("(b) post-local SGD, period 16", "periodic", period=16),
        Row(f"(c) hierarchical, 2 levels: node gradients ({node}) every step, {{32:world}}", "hierarchical", hierarchy={32: "world"}, hook_subgroup=node),
        Row(f"(d) hierarchical, 3 levels: pair gradients every step, {{4:{node}, 32:world}}", "hierarchical", hierarchy={4: node, 32: "world"}, hook_subgroup=pair),
        Row(f"(e) hierarchical, 3 levels: pair gradients every step, {{4:{node}, 64:world}}", "hierarchical", hierarchy={4: node, 64: "world"}, hook_subgroup=pair),
        # (c) with an outer optimizer on the top level: digits found lr 1.0 / momentum 0.5 good there.
        Row(f"(f) hierarchical DiLoCo, 2 levels: node gradients ({node}) every step, {{32:world}} outer Nesterov lr 1.0 m 0.5, bf16", "hierarchical", hierarchy={32: "world"}, hook_subgroup=node, averager_kwargs=outer_kwargs([32], True, 1.0, 0.5, top=32)),
        Row("(g) torchft DiLoCo (peer), every 32, outer Nesterov lr 0.7 m 0.9", "torchft", period=32),
        # (d) with outer steps on both averaging levels, int8 on the world level; and (f) with int8.
        Row(f"(h) hierarchical DiLoCo, 3 levels: pair gradients every step, {{4:{node}, 32:world}} outer Nesterov lr 1.0 m 0.5 on both, int8", "hierarchical", hierarchy={4: node, 32: "world"}, hook_subgroup=pair, averager_kwargs=outer_kwargs([4, 32], torch.int8, 1.0, 0.5, top=32)),
        Row(f"(i) hierarchical DiLoCo, 2 levels: node gradients ({node}) every step, {{32:world}} outer Nesterov lr 1.0 m 0.5, int8", "hierarchical", hierarchy={32: "world"}, hook_subgroup=node, averager_kwargs=outer_kwargs([32], torch.int8, 1.0, 0.5, top=32)),
        # (d) with each pair of ranks one FSDP2 replica (--shard-size 2): FSDP2's reduce-scatter averages the pair's
        # gradients as (d)'s hook does, and the averager averages each rank's shards with the same slice elsewhere.
        Row(f"(j) (d) sharded: FSDP2 over pairs (--shard-size {pair}), {{4:{node}, 32:world}}", "hierarchical", hierarchy={4: node, 32: "world"}, shard_size=pair),
    ]


SWEEP_LRS = (0.4, 0.7, 1.0)
SWEEP_MOMENTA = (0.5, 0.9)
SWEEP_TOPS = (16, 32)
SWEEP_WIRES = {"bf16": torch.bfloat16, "int8": torch.int8}
SWEEP_DELAYS = (1, 2)


def sweep_code(top: int, lr: float, momentum: float, wire: str, delay: int = 0) -> str:
    """A swept configuration's short name, e.g. ``t32-lr0.7-m0.9-bf16`` (``-d2``: ``sync_delays`` 2)."""
    return f"t{top}-lr{lr}-m{momentum}-{wire}" + (f"-d{delay}" if delay else "")


def sweep_rows(world: int) -> list[Row]:
    """``--sweep``: (f)'s hierarchical DiLoCo over the grid of issue 22, plus DDP to compare with.

    Node gradients every step, ``{top: world}`` with outer Nesterov (lr, momentum) and the
    pseudo-gradient on a bf16 or int8 wire; each point also with its sync overlapped by 1 or 2
    steps (``sync_delays``), run only when selected with ``--codes``.
    """
    node = 4 if world >= 8 else 2
    rows = [Row("[ddp] (a) DDP", "ddp")]
    for wire, dtype in SWEEP_WIRES.items():  # bf16 first: a sweep cut short has every bf16 point
        for top in SWEEP_TOPS:
            for lr in SWEEP_LRS:
                for momentum in SWEEP_MOMENTA:
                    for delay in (0, *SWEEP_DELAYS):
                        code = sweep_code(top, lr, momentum, wire, delay)
                        kwargs = outer_kwargs([top], dtype, lr, momentum, top=top, delay=delay)
                        name = f"[{code}] hierarchical DiLoCo, node gradients ({node}) every step, {{{top}:world}} outer Nesterov lr {lr} m {momentum}, {wire}"
                        if delay:
                            name += f", sync delay {delay}"
                        rows.append(Row(name, "hierarchical", hierarchy={top: "world"}, hook_subgroup=node, averager_kwargs=kwargs))
    return rows


def row_code(row: Row) -> str:
    """The ``[code]`` a sweep row's name starts with."""
    return row.name[1 : row.name.index("]")]


class TrafficCounter:
    """Wraps ``dist.all_reduce`` to count bytes per rank, global (a group spanning nodes) vs subgroup.

    A "node" is ``node`` consecutive ranks. A group is global when its ranks are on more than one
    node: the world, or for a sharded model the ranks of every node holding this rank's slice.
    """

    def __init__(self, node: int) -> None:
        self.global_bytes = 0
        self.subgroup_bytes = 0
        self.node = node
        self._original = dist.all_reduce
        self._spans: dict[Any, bool] = {}

    def spans_nodes(self, group) -> bool:
        if group not in self._spans:
            ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
            self._spans[group] = len({rank // self.node for rank in ranks}) > 1
        return self._spans[group]

    def count(self, nbytes: int, group) -> None:
        if self.spans_nodes(group):
            self.global_bytes += nbytes
        else:
            self.subgroup_bytes += nbytes

    def install(self) -> None:
        counter = self

        def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            counter.count(tensor.numel() * tensor.element_size(), group)
            return counter._original(tensor, op=op, group=group, async_op=async_op)

        def counting_all_to_all_single(output, input, *args, group=None, **kwargs):
            # Our compressed level: a reduce-scatter and an all-gather of the payload, half each.
            counter.count(input.numel() * input.element_size() // 2, group)
            return original_all_to_all(output, input, *args, group=group, **kwargs)

        original_all_to_all = dist.all_to_all_single
        dist.all_reduce = counting_all_reduce
        dist.all_to_all_single = counting_all_to_all_single

    def reset(self) -> None:
        self.global_bytes = self.subgroup_bytes = 0


class DigitsTask:
    """scikit-learn's digits, an MLP, SGD with momentum; test accuracy (higher is better)."""

    metric = "test accuracy"
    higher_is_better = True

    def __init__(self, args: argparse.Namespace) -> None:
        from train_digits import load_data

        self.args = args
        self.x_train, self.y_train, self.x_test, self.y_test = load_data(0)

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.args.lr, momentum=0.9)

    def lr(self, step: int) -> float:
        """Linear warmup over 20 steps, then cosine decay: the same for every configuration."""
        steps, base = self.args.steps, self.args.lr
        if step < 20:
            return base * (step + 1) / 20
        return base * 0.5 * (1 + math.cos(math.pi * (step - 20) / max(1, steps - 20)))

    def loss(self, ddp, seed: int, step: int, rank: int, world: int) -> torch.Tensor:
        idx = batch_indices(seed, step, rank, world, self.args.batch_size, len(self.x_train))
        return torch.nn.functional.cross_entropy(ddp(self.x_train[idx]), self.y_train[idx])

    def evaluate(self, model: torch.nn.Module) -> float:
        with torch.no_grad():
            return (model(self.x_test).argmax(1) == self.y_test).float().mean().item()


class LMTask:
    """``examples/train_lm.py``'s byte-level GPT and corpus; validation loss (lower is better)."""

    metric = "val loss"
    higher_is_better = False

    def __init__(self, args: argparse.Namespace) -> None:
        import train_lm

        self.args, self.lm = args, train_lm
        self.corpus = train_lm.load_corpus(args.corpus_bytes)
        self.held_out = train_lm.val_windows(self.corpus.val, args.val_windows, args.context)
        self.cfg = train_lm.GPTConfig(context=args.context, width=args.width, layers=args.layers, heads=args.heads)

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.lm.TinyGPT(self.cfg)

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.args.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def lr(self, step: int) -> float:
        return self.lm.lr_at(step, self.args.steps, self.args.lr, 20)

    def loss(self, ddp, seed: int, step: int, rank: int, world: int) -> torch.Tensor:
        inputs, targets = self.lm.lm_batch(self.corpus.train, seed, step, rank, world, self.args.batch_size, self.args.context)
        return self.lm.lm_loss(ddp, inputs, targets)

    def clip(self, model: torch.nn.Module) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def evaluate(self, model: torch.nn.Module) -> float:
        return self.lm.val_loss(model, self.held_out, torch.device("cpu"))


TASKS = {"digits": DigitsTask, "lm": LMTask}
ROWS = {"digits": digits_rows, "lm": lm_rows}


def build(row: Row, ddp: DistributedDataParallel, warmup: int) -> Any:
    """Register ``row``'s comm hook on ``ddp`` and return its averager (``None`` for DDP)."""
    if row.kind == "ddp":
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)  # what DDP does by default, through dist.all_reduce
        return None
    if row.kind == "periodic":
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook

        ddp.register_comm_hook(PostLocalSGDState(None, None, warmup, post_local_gradient_allreduce=False), post_localSGD_hook)
        return PeriodicModelAverager(period=row.period, warmup_steps=warmup)
    module = ddp if row.shard_size else ddp.module
    kwargs = row.averager_kwargs(list(module.parameters())) if row.averager_kwargs else {}
    averager = HierarchicalModelAverager(row.hierarchy, warmup_steps=warmup, **kwargs)
    if not row.shard_size:  # FSDP2 reduces a replica's gradients itself
        attach_post_local_sgd(ddp, averager, subgroup=hook_subgroup(row.hook_subgroup) if row.hook_subgroup else None)
    return averager


_MESHES: dict[int, Any] = {}


def shard(model: torch.nn.Module, shard_size: int) -> torch.nn.Module:
    """FSDP2 over the ``"shard"`` dim of a ``(world / N, N)`` mesh, block by block, as ``train_lm.py --shard-size`` does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if shard_size not in _MESHES:  # made once (collectively) and reused
        _MESHES[shard_size] = init_device_mesh("cpu", (dist.get_world_size() // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    mesh = _MESHES[shard_size]["shard"]
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


_SUBGROUPS: dict[int, dist.ProcessGroup] = {}


def hook_subgroup(size: int) -> dist.ProcessGroup:
    """This rank's block of ``size`` contiguous ranks; made once (collectively, in row order) and reused."""
    if size not in _SUBGROUPS:
        _SUBGROUPS[size] = dist.new_subgroups(size)[0]
    return _SUBGROUPS[size]


def run_torchft(task, row: Row, seed: int, args: argparse.Namespace, rank: int, world: int) -> dict:
    """torchft's DiLoCo (every ``row.period`` steps, outer Nesterov lr 0.7 m 0.9, no warmup) on the same task."""
    from torchft_peer import torchft_diloco

    model = task.model(seed)
    optimizer = task.optimizer(model.parameters())
    clip = getattr(task, "clip", None)
    curve = []
    start = time.perf_counter()
    with torchft_diloco(args.lighthouse, f"bench_{rank}_seed{seed}", model, optimizer, row.period, min_replicas=world) as peer:
        for step in range(args.steps):
            for group in optimizer.param_groups:
                group["lr"] = task.lr(step)
            optimizer.zero_grad(set_to_none=True)
            task.loss(model, seed, step, rank, world).backward()
            if clip is not None:
                clip(model)
            optimizer.step()  # DiLoCo syncs inside, every row.period steps
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                curve.append((step + 1, peer.allreduce_bytes, task.evaluate(model) if rank == 0 else float("nan")))
        syncs = peer.manager_steps
    assert syncs == args.steps // row.period, f"torchft committed {syncs} outer steps, expected {args.steps // row.period}"
    wall = time.perf_counter() - start
    return {"name": row.name, "seed": seed, "metric": curve[-1][2], "global_bytes": curve[-1][1], "subgroup_bytes": 0, "wall_s": wall, "curve": curve}


def run_one(task, row: Row, seed: int, args: argparse.Namespace, counter: TrafficCounter, rank: int, world: int) -> dict:
    if row.kind == "torchft":
        return run_torchft(task, row, seed, args, rank, world)
    model = task.model(seed)
    ddp = shard(model, row.shard_size) if row.shard_size else DistributedDataParallel(model)
    optimizer = task.optimizer(ddp.parameters())
    averager = build(row, ddp, args.warmup)
    clip = getattr(task, "clip", None)
    counter.reset()
    curve = []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = task.lr(step)
        optimizer.zero_grad(set_to_none=True)
        task.loss(ddp, seed, step, rank, world).backward()
        if clip is not None:
            clip(model)
        optimizer.step()
        if averager is not None:
            averager.average_parameters(ddp.parameters())
        if step + 1 == args.steps and "sync delay" in row.name:
            # The last step fired a delayed world sync that would land after the run: finish it, as a
            # job ends on synchronize. The plain fp32 mean over the world that follows is of equal
            # parameters, a no-op a fair byte count leaves out (the other rows end on a sync too).
            averager.synchronize(ddp.parameters())
            counter.global_bytes -= sum(p.numel() * p.element_size() for p in model.parameters())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            # A sharded model's forward is collective: every rank of a replica takes part.
            evaluated = task.evaluate(model) if rank == 0 or row.shard_size else float("nan")
            curve.append((step + 1, counter.global_bytes, evaluated if rank == 0 else float("nan")))
    wall = time.perf_counter() - start
    return {"name": row.name, "seed": seed, "metric": curve[-1][2], "global_bytes": counter.global_bytes, "subgroup_bytes": counter.subgroup_bytes, "wall_s": wall, "curve": curve}


def task_rows(args: argparse.Namespace, world: int) -> list[Row]:
    """Every row of this invocation's table: the task's, or with ``--sweep`` the grid's."""
    return sweep_rows(world) if args.sweep else ROWS[args.task](world)


def selected_rows(args: argparse.Namespace, world: int) -> list[Row]:
    """The rows to run: with ``--sweep`` those whose code is in ``--codes`` (default: DDP and every
    undelayed point); else those whose letter is in ``--rows`` when given."""
    rows = task_rows(args, world)
    if args.sweep:
        codes = args.codes.split(",") if args.codes else None
        return [row for row in rows if (row_code(row) in codes if codes else "-d" not in row_code(row))]
    return [row for row in rows if args.rows is None or row.name[1] in args.rows]


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, runs_path: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    counter = TrafficCounter(node=4 if world >= 8 else 2)
    counter.install()
    task = TASKS[args.task](args)
    done = {(r["seed"], r["name"]) for r in load_runs(runs_path)}  # read before any rank appends
    dist.barrier()
    rows = selected_rows(args, world)
    # The sweep goes point by point (every seed of one point before the next), the table seed by seed.
    order = [(seed, row) for row in rows for seed in args.seeds] if args.sweep else [(seed, row) for seed in args.seeds for row in rows]
    for seed, row in order:
        if row.pending or (seed, row.name) in done:
            continue
        dist.barrier()
        run = run_one(task, row, seed, args, counter, rank, world)
        if rank == 0:
            with runs_path.open("a") as f:  # one line per finished run: an interrupted bench keeps what it measured
                f.write(json.dumps(run) + "\n")
            print(f"seed {seed} {row.name}: {task.metric} {run['metric']:.4f}, global {run['global_bytes'] / 1e6:.1f} MB, {run['wall_s']:.1f} s", flush=True)
    dist.destroy_process_group()


def output_stem(args: argparse.Namespace) -> str:
    stem = "convergence" if args.task == "digits" else f"convergence-{args.task}"
    stem += "-sweep" if args.sweep else ""
    default_world = 4 if args.task == "digits" else 8
    return stem if args.world_size == default_world else f"{stem}-w{args.world_size}"


def summarize(runs: list[dict], args: argparse.Namespace, out_dir: Path) -> str:
    task_cls = TASKS[args.task]
    rows = task_rows(args, args.world_size)
    if args.sweep:  # 72 grid points: list those with runs only, and add the frontier plot
        rows = [row for row in rows if any(r["name"] == row.name for r in runs)]
        plot_frontier(runs, rows, args, out_dir)
    accuracy = task_cls.higher_is_better
    ddp_metric = statistics.mean(r["metric"] for r in runs if r["name"] == rows[0].name)
    ddp_bytes = statistics.mean(r["global_bytes"] for r in runs if r["name"] == rows[0].name)
    if accuracy:
        header = f"{args.world_size} gloo workers, {args.steps} steps, batch {args.batch_size}/worker, seeds {args.seeds}, warmup {args.warmup} steps, bytes per rank"
        metric_col, delta_col = "test accuracy (mean ± sd)", "vs DDP"
    else:
        tokens = args.steps * args.world_size * args.batch_size * args.context
        header = (
            f"{args.world_size} gloo workers, {args.steps} steps x batch {args.batch_size}/worker x {args.context} bytes = {tokens / 1e6:.2f} M training bytes "
            f"for every row, seeds {args.seeds}, warmup {args.warmup} steps, {args.val_windows} held-out windows, bytes per rank"
        )
        metric_col, delta_col = "val loss, nats/byte (mean ± sd)", "vs DDP"
    lines = [header, "", f"| configuration | {metric_col} | {delta_col} | global bytes | fewer global bytes | subgroup bytes | wall s |", "|---|---|---|---|---|---|---|"]
    if not accuracy:
        lines[2] = lines[2].replace("| configuration |", "| configuration | seeds |")
        lines[3] += "---|"
    for row in rows:
        rs = [r for r in runs if r["name"] == row.name]
        if not rs:
            lines.append(f"| {row.name} |{'' if accuracy else ' |'} pending: {row.pending or 'not run yet'} | | | | | |")
            continue
        values = [r["metric"] * 100 if accuracy else r["metric"] for r in rs]
        mean, sd = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        gb = statistics.mean(r["global_bytes"] for r in rs)
        sb = statistics.mean(r["subgroup_bytes"] for r in rs)
        wall = statistics.mean(r["wall_s"] for r in rs)
        if accuracy:
            value, delta = f"{mean:.2f} ± {sd:.2f} %", f"{mean - ddp_metric * 100:+.2f} pp"
        else:
            value, delta = f"{mean:.4f} ± {sd:.4f}", f"{(mean / ddp_metric - 1) * 100:+.2f} %"
        seeds = "" if accuracy else f" {len(rs)} |"
        lines.append(f"| {row.name} |{seeds} {value} | {delta} | {gb / 1e6:.1f} MB | {ddp_bytes / gb:.1f}x | {sb / 1e6:.1f} MB | {wall:.1f} |")
    table = "\n".join(lines)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Every row gets a line: digits (c) and (d) coincide at 4 workers, hence the dashes.
    markers = ["o", "s", "^", "x", "D", "v", "P", "*", "h", "<", ">", "d", "p"]
    linestyles = ["-", "-", "-", "--", ":", "-", "-.", "-", ":", "--", "-", "-.", ":"]
    styles = [(linestyles[i % len(linestyles)], markers[i % len(markers)]) for i in range(len(rows))]
    for row, (line, marker) in zip(rows, styles):
        rs = [r for r in runs if r["name"] == row.name]
        if not rs:
            continue
        points = list(zip(*[r["curve"] for r in rs]))
        xs = [max(statistics.mean(p[1] for p in pts) / 1e6, 1e-3) for pts in points]
        ys = [statistics.mean(p[2] for p in pts) * (100 if accuracy else 1) for pts in points]
        ax.plot(xs, ys, linestyle=line, marker=marker, markersize=4, label=row.name)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("global traffic per rank so far (MB, log scale)")
    if accuracy:
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(80, 100)
        ax.set_title(f"digits, {args.world_size} workers: accuracy vs global traffic (mean of {len(args.seeds)} seeds)")
        ax.legend(loc="lower right", fontsize=6, ncol=2)
    else:
        ax.set_ylabel("validation loss (nats per byte)")
        ax.set_title(f"byte-level GPT, {args.world_size} workers: val loss vs global traffic (mean of {len(args.seeds)} seeds)", fontsize=10)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7)  # below: the names are long
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    stem = output_stem(args)
    fig.savefig(out_dir / f"{stem}.png", dpi=120, bbox_inches="tight")
    (out_dir / f"{stem}.md").write_text(table + "\n")
    return table


def plot_frontier(runs: list[dict], rows: list[Row], args: argparse.Namespace, out_dir: Path) -> None:
    """Every swept point's mean final loss against its global bytes, the best point at each byte
    budget joined, DDP and DDP + 2 % as lines; ``<stem>-frontier.png`` and a markdown list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ddp = statistics.mean(r["metric"] for r in runs if r["name"] == rows[0].name)
    points = []
    for row in rows[1:]:
        rs = [r for r in runs if r["name"] == row.name]
        points.append((statistics.mean(r["global_bytes"] for r in rs) / 1e6, statistics.mean(r["metric"] for r in rs), row_code(row), len(rs)))
    budgets: dict[float, tuple] = {}
    for point in points:  # the best (lowest-loss) point at each byte budget
        key = round(point[0], 1)
        if key not in budgets or point[1] < budgets[key][1]:
            budgets[key] = point
    # The frontier: budgets whose best point beats every cheaper budget's (lower loss for more bytes).
    frontier, best = [], math.inf
    for point in sorted(budgets.values()):
        if point[1] < best:
            frontier.append(point)
            best = point[1]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for wire, marker in (("bf16", "o"), ("int8", "s")):
        xs = [p[0] for p in points if f"-{wire}" in p[2]]
        ys = [p[1] for p in points if f"-{wire}" in p[2]]
        ax.scatter(xs, ys, marker=marker, alpha=0.6, label=f"swept points, {wire} wire")
    ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "k-", label="frontier: the best point at each byte budget")
    ax.axhline(ddp, color="tab:green", linestyle="--", label="DDP")
    ax.axhline(ddp * 1.02, color="tab:red", linestyle=":", label="DDP + 2 % (goal: below it ...)")
    ddp_mb = statistics.mean(r["global_bytes"] for r in runs if r["name"] == rows[0].name) / 1e6
    ax.axvline(ddp_mb / 30, color="tab:red", linestyle="-.", label="DDP's bytes / 30 (... and left of it)")
    import matplotlib.ticker

    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for x, y, code, _ in frontier:
        ax.annotate(code, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("global traffic per rank (MB, log scale)")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title(f"hierarchical DiLoCo sweep, {args.world_size} workers, seeds {args.seeds}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    stem = output_stem(args)
    fig.savefig(out_dir / f"{stem}-frontier.png", dpi=120)
    lines = ["| byte budget (global MB) | best point | seeds | val loss | vs DDP | on the frontier |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {x:.1f} | {code} | {n} | {y:.4f} | {(y / ddp - 1) * 100:+.2f} % | {'yes' if (x, y, code, n) in frontier else 'no'} |"
        for x, y, code, n in sorted(budgets.values())
    ]
    (out_dir / f"{stem}-frontier.md").write_text("\n".join(lines) + "\n")


TASK_DEFAULTS = {
    # digits: 641 steps, so the last step (640) averages globally in every configuration.
    "digits": {"steps": 641, "warmup": 20, "batch_size": 32, "lr": 0.05, "eval_every": 40, "world_size": 4},
    # lm: 513 steps, so the last step (512) averages globally in every configuration.
    "lm": {"steps": 513, "warmup": 0, "batch_size": 4, "lr": 2e-3, "eval_every": 64, "world_size": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="digits 641, lm 513: the last step averages globally in every configuration")
    parser.add_argument("--warmup", type=int, help="post-local-SGD warmup steps (digits 20, lm 0)")
    parser.add_argument("--batch-size", type=int, help="per worker (digits 32, lm 4 windows)")
    parser.add_argument("--lr", type=float, help="digits 0.05 (SGD), lm 2e-3 (AdamW)")
    parser.add_argument("--eval-every", type=int, help="digits 40, lm 64")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--world-size", type=int, help="digits 4 (8 or more gives (d) a real third level), lm 8")
    parser.add_argument("--rows", help="letters of the rows to run, e.g. abcd (default: all)")
    parser.add_argument("--resume", action="store_true", help="keep finished runs from an earlier invocation (same flags) and run the rest")
    parser.add_argument("--summarize-only", action="store_true", help="only rebuild the table and plot from the runs file")
    parser.add_argument("--sweep", action="store_true", help="lm: the hierarchical DiLoCo grid (outer lr, momentum, top period, wire) instead of the table's rows; writes <stem>-sweep*")
    parser.add_argument("--codes", help="with --sweep: comma-separated codes to run, e.g. ddp,t32-lr0.7-m0.9-bf16,t32-lr0.7-m0.9-bf16-d2 (default: ddp and every undelayed point)")
    lm = parser.add_argument_group("lm task")
    lm.add_argument("--context", type=int, default=64)
    lm.add_argument("--width", type=int, default=96)
    lm.add_argument("--layers", type=int, default=2)
    lm.add_argument("--heads", type=int, default=4)
    lm.add_argument("--corpus-bytes", type=int, default=2_000_000)
    lm.add_argument("--val-windows", type=int, default=128)
    args = parser.parse_args()
    if args.sweep and args.task != "lm":
        parser.error("--sweep is the language-model grid: add --task lm")
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args)
    runs_path = out_dir / f"{stem}-runs.jsonl"
    if not args.summarize_only:
        if not args.resume:
            runs_path.unlink(missing_ok=True)
        lighthouse = None
        if any(row.kind == "torchft" and not row.pending for row in selected_rows(args, args.world_size)):
            from torchft_peer import start_lighthouse

            lighthouse = start_lighthouse(min_replicas=args.world_size)  # torchft's real lighthouse
            args.lighthouse = lighthouse.address()
        port = free_port()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(rank, args.world_size, port, args, runs_path)) for rank in range(args.world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if lighthouse is not None:
            lighthouse.shutdown()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a worker failed (exit codes {[p.exitcode for p in procs]}); finished runs are in {runs_path}, rerun with --resume")
    runs = [r for r in load_runs(runs_path) if r["seed"] in args.seeds]
    first = task_rows(args, args.world_size)[0].name
    if not any(r["name"] == first for r in runs):
        raise SystemExit(f"no finished {first} run for seeds {args.seeds} in {runs_path}: run the bench (without --summarize-only) first")
    print(summarize(runs, args, out_dir))
    print(f"\nwrote {out_dir / f'{stem}.md'} and {out_dir / f'{stem}.png'} (runs: {runs_path})")


if __name__ == "__main__":
    main()
