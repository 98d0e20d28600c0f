"""Accuracy versus global traffic: DDP, post-local SGD and hierarchical SGD on digits.

    python bench/convergence.py [--seeds 0 1 2] [--steps 641] [--out docs]

`--world-size` gloo workers on this machine (4 by default), scikit-learn's digits with a fixed held-out
test split, the same MLP, seeds, learning-rate schedule and number of steps for:

(a) DDP: gradients all-reduced over the world every step;
(b) post-local SGD, one level: torch's ``PeriodicModelAverager`` (period 8);
(c) elastic_hsgd's averager, two levels {2: 2, 16: world};
(d) elastic_hsgd's averager, three levels: {2: 2, 16: 4, 32: 4} at 4 workers (where
    a third level can only repeat a group size, as in torch's own tests), and
    {2: 2, 8: 4, 32: world} with ``--world-size 8``.

(b)-(d) run torch's post-local-SGD hook: global gradient all-reduce for the
first ``--warmup`` steps, local steps after. Every ``dist.all_reduce`` is
counted (bytes per rank, by whether its group spans the world), DDP's included
(it runs through the equivalent allreduce comm hook). Writes a markdown table
and a PNG of test accuracy versus global bytes.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from elastic_hsgd import HierarchicalModelAverager  # noqa: E402
from tests.distributed import free_port  # noqa: E402
from elastic_hsgd.elastic import attach_post_local_sgd  # noqa: E402
from train_digits import batch_indices, load_data  # noqa: E402

def configs(world: int) -> OrderedDict:
    three = {2: 2, 16: 4, 32: 4} if world < 8 else {2: 2, 8: 4, 32: "world"}
    return OrderedDict(
        [
            ("(a) DDP", None),
            ("(b) post-local SGD, period 8", "periodic"),
            ("(c) hierarchical {2:2, 16:world}", {2: 2, 16: "world"}),
            ("(d) hierarchical {" + ", ".join(f"{p}:{s}" for p, s in three.items()) + "}", three),
        ]
    )


class TrafficCounter:
    """Wraps ``dist.all_reduce`` to count bytes per rank, global vs subgroup."""

    def __init__(self) -> None:
        self.global_bytes = 0
        self.subgroup_bytes = 0
        self._original = dist.all_reduce

    def install(self) -> None:
        counter = self

        def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            nbytes = tensor.numel() * tensor.element_size()
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            if size == dist.get_world_size():
                counter.global_bytes += nbytes
            else:
                counter.subgroup_bytes += nbytes
            return counter._original(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = counting_all_reduce

    def reset(self) -> None:
        self.global_bytes = self.subgroup_bytes = 0


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def lr_at(step: int, steps: int, base: float) -> float:
    """Linear warmup over 20 steps, then cosine decay: the same for every configuration."""
    if step < 20:
        return base * (step + 1) / 20
    return base * 0.5 * (1 + math.cos(math.pi * (step - 20) / max(1, steps - 20)))


def run_one(name, config, seed, args, data, counter, rank, world):
    x_train, y_train, x_test, y_test = data
    model = make_model(seed)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    averager = None
    if config is None:
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)  # what DDP does by default, through dist.all_reduce
    elif config == "periodic":
        averager = PeriodicModelAverager(period=8, warmup_steps=args.warmup)
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook

        ddp.register_comm_hook(PostLocalSGDState(None, None, args.warmup, post_local_gradient_allreduce=False), post_localSGD_hook)
    else:
        averager = HierarchicalModelAverager(config, warmup_steps=args.warmup)
        attach_post_local_sgd(ddp, averager)
    counter.reset()
    curve = []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        idx = batch_indices(seed, step, rank, world, args.batch_size, len(x_train))
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ddp(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
        if averager is not None:
            averager.average_parameters(ddp.parameters())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with torch.no_grad():
                acc = (model(x_test).argmax(1) == y_test).float().mean().item()
            curve.append((step + 1, counter.global_bytes, acc))
    wall = time.perf_counter() - start
    return {"name": name, "seed": seed, "accuracy": curve[-1][2], "global_bytes": counter.global_bytes, "subgroup_bytes": counter.subgroup_bytes, "wall_s": wall, "curve": curve}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    counter = TrafficCounter()
    counter.install()
    data = load_data(0)
    out = []
    for seed in args.seeds:
        for name, config in configs(world).items():
            dist.barrier()
            out.append(run_one(name, config, seed, args, data, counter, rank, world))
    if rank == 0:
        results.put(out)
    dist.destroy_process_group()


def summarize(runs: list[dict], args: argparse.Namespace, out_dir: Path) -> str:
    names = list(configs(args.world_size))
    suffix = "" if args.world_size == 4 else f"-w{args.world_size}"
    ddp_acc = statistics.mean(r["accuracy"] for r in runs if r["name"] == "(a) DDP")
    ddp_bytes = statistics.mean(r["global_bytes"] for r in runs if r["name"] == "(a) DDP")
    lines = [
        f"{args.world_size} gloo workers, {args.steps} steps, batch {args.batch_size}/worker, seeds {args.seeds}, warmup {args.warmup} steps, "
        "bytes per rank",
        "",
        "| configuration | test accuracy (mean ± sd) | vs DDP | global bytes | fewer global bytes | subgroup bytes | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = [r for r in runs if r["name"] == name]
        accs = [r["accuracy"] * 100 for r in rs]
        gb = statistics.mean(r["global_bytes"] for r in rs)
        sb = statistics.mean(r["subgroup_bytes"] for r in rs)
        wall = statistics.mean(r["wall_s"] for r in rs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {name} | {statistics.mean(accs):.2f} ± {sd:.2f} % | {statistics.mean(accs) - ddp_acc * 100:+.2f} pp | "
            f"{gb / 1e6:.1f} MB | {ddp_bytes / gb:.1f}x | {sb / 1e6:.1f} MB | {wall:.1f} |"
        )
    table = "\n".join(lines)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = [("-", "o"), ("-", "s"), ("-", "^"), ("--", "x")]  # (c) and (d) coincide at 4 workers
    for name, (line, marker) in zip(names, styles):
        rs = [r for r in runs if r["name"] == name]
        points = list(zip(*[r["curve"] for r in rs]))
        xs = [statistics.mean(p[1] for p in pts) / 1e6 for pts in points]
        ys = [statistics.mean(p[2] for p in pts) * 100 for pts in points]
        ax.plot(xs, ys, linestyle=line, marker=marker, markersize=4, label=name)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("global all-reduce traffic per rank so far (MB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(80, 100)
    ax.set_title(f"digits, {args.world_size} workers: accuracy vs global traffic (mean of {len(args.seeds)} seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"convergence{suffix}.png", dpi=120)
    (out_dir / f"convergence{suffix}.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=641, help="641: the last step (640) averages globally in every configuration")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--world-size", type=int, default=4, help="8 or more gives (d) a real third level")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(rank, args.world_size, port, args, results)) for rank in range(args.world_size)]
    for p in procs:
        p.start()
    runs = results.get(timeout=3600)
    for p in procs:
        p.join()
    print(summarize(runs, args, out_dir))
    suffix = "" if args.world_size == 4 else f"-w{args.world_size}"
    print(f"\nwrote {out_dir / f'convergence{suffix}.md'} and {out_dir / f'convergence{suffix}.png'}")


if __name__ == "__main__":
    main()
