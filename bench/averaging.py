"""Averaging cost: a bare all_reduce vs torch's averager vs ours, side by side.

    python bench/averaging.py [--world-size 4] [--params 10_000_000] [--iters 30]

Starts ``--world-size`` gloo processes on this machine, builds a model of about
``--params`` fp32 parameters, and for a global step and a subgroup step times,
interleaved in one run:

(a) ``dist.all_reduce`` of one pre-flattened buffer of the same bytes over the
    same group: the floor;
(b) torch's ``HierarchicalModelAverager.average_parameters``;
(c) ``elastic_hsgd.HierarchicalModelAverager.average_parameters``;

and, for anchored global levels (no torch counterpart, so no (b)): a bf16
level (pseudo-gradient sent as bf16 both ways, summed in fp32; goal c/a <= 0.6;
its (b) column is its two bf16 all_to_alls alone, without casts or sums, and a
line below times its passes over memory alone: produce, reduce, consume, and the
least any anchored level must do: one pass reading anchor and parameters, one
writing the parameters), an fp32 level with an outer Nesterov step, both, and an
int8 level (per-row scales: a quarter of the bytes plus one fp32 scale per 256).

The ``sharded world`` row is the same model sharded with FSDP2 over pairs of
ranks (a ``(world / 2, 2)`` mesh): (c) averages each rank's local shards with the
ranks holding the same slice, (a) is a bare all_reduce of the same shard bytes
over that same group (goal c/a <= 1.10), and there is no torch counterpart.

Prints median milliseconds per call and the ratios c/a and c/b.

``--step-time`` measures something else: the step time of a training loop with
realistic compute (``examples/train_lm.py``'s byte-level GPT, forward, backward
and AdamW on every rank) and an overlapped world level (``{--period: "world"}``,
outer Nesterov, ``--comm-dtype`` on the wire, ``sync_delays={period: tau}`` for
each ``--taus``), against the same loop with no world level at all. Variants run
interleaved, one period at a time, each with its own model; the world level's cost
is ``(loop with it) / (loop without it) - 1`` (goal for tau >= 2: at most 5 % at
4 Gbit/s).

On one machine the "link" is loopback, where a transfer is a memory copy on the
same cores as everything else. ``--link-rate 4gbit`` runs the same measurement
over a bandwidth-limited link instead: the script re-runs itself in a new network
namespace whose loopback is shaped by a token bucket (``tc ... tbf``) shared by all
ranks (needs root and iproute2; the machine's own loopback is untouched).
"""

from __future__ import annotations

import argparse
import functools
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
from elastic_hsgd import HierarchicalModelAverager, outer  # noqa: E402
from tests.distributed import free_port  # noqa: E402


def make_model(n_params: int) -> torch.nn.Module:
    width = 1024
    layers = max(1, round(n_params / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def shard_model(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    """FSDP2 over the ``"shard"`` dim of a ``(world / 2, 2)`` mesh, layer by layer (the ``sharded world`` row)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        fully_shard(layer, mesh=mesh["shard"])
    return fully_shard(model, mesh=mesh["shard"])


def time_call(fn, group) -> float:
    dist.barrier(group)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def storage_pointers(model: torch.nn.Module, averager: HierarchicalModelAverager) -> list[int]:
    """Where the parameters (local shards of DTensors) and every buffer the averager keeps live (anchors, deltas, wire)."""
    tensors = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()] + list(averager._deltas)
    tensors += [a for lv in averager._anchored for a in lv.anchors]
    tensors += [t for lv in averager._anchored if lv.optimizer for s in lv.optimizer.state.values() for t in s.values()]
    tensors += [t for wire in averager._wire.values() for t in wire.tensors()]
    return [t.data_ptr() for t in tensors]


def compressed_passes(n: int, size: int) -> dict[str, callable]:
    """The bf16 level's passes over memory alone, no transfers: the same calls on the same chunks as the averager.

    ``produce``: delta = anchor - params (fp32) and its cast into the bf16 wire
    buffer; ``reduce``: the fp32 sum of this rank's 1/n slice of everyone's
    wire values, its cast back and its copy into the gather buffer;
    ``consume``: the gathered mean back to fp32, ``anchor -= mean``,
    ``params := anchor``.
    """
    padded, _ = outer.wire_layout(n, size)
    chunk = min(padded, max(size, HierarchicalModelAverager.CPU_WIRE_CHUNK_ELEMENTS // size * size))
    anchor, params, delta = torch.randn(n) * 0.03, torch.randn(n) * 0.03, torch.empty(n)
    wire, received, mean_out = (torch.zeros(padded, dtype=torch.bfloat16) for _ in range(3))
    total, row = torch.empty(chunk // size), torch.empty(chunk // size)
    bounds = [(start, min(start + chunk, padded)) for start in range(0, padded, chunk)]

    def produce() -> None:
        for start, stop in bounds:
            end = min(stop, n)
            outer.pseudo_gradient(anchor[start:end], params[start:end], out=delta[start:end])
            outer.encode(delta[start:end], wire[start:stop])

    def reduce() -> None:
        for start, stop in bounds:
            per_rank = (stop - start) // size
            m = mean_out[start:stop]
            outer.reduce_slices(received[start:stop], size, total[:per_rank], m[:per_rank], row[:per_rank])
            m.view(size, per_rank)[1:].copy_(m[:per_rank].expand(size - 1, per_rank))

    def consume() -> None:
        for start, stop in bounds:
            end = min(stop, n)
            outer.decode(wire[start:stop], delta[start:end])
            outer.outer_update(anchor[start:end], delta[start:end], None)
            params[start:end].copy_(anchor[start:end])

    def least_read() -> None:
        # The least any anchored level must do before sending: read anchor and parameters once.
        torch.sub(anchor, params, out=delta)

    def least_write() -> None:
        # ... and after receiving: write the parameters once.
        params.copy_(anchor)

    return {"produce": produce, "reduce": reduce, "consume": consume, "least_read": least_read, "least_write": least_write}


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    sub = world_size // 2
    nesterov = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True, foreach=True)  # as the examples build it
    cases = {
        # Period 1 at the top: every call is a global step.
        "global step": (OrderedDict([(1, world_size)]), {}),
        # Period 1 below a top level that never fires after step 0: every later call is a subgroup step.
        "subgroup step": (OrderedDict([(1, sub), (10**9, world_size)]), {}),
        # Anchored global levels: bf16 pseudo-gradient, outer Nesterov step, both.
        "bf16 level": (OrderedDict([(1, world_size)]), {"comm_dtypes": {1: torch.bfloat16}}),
        "outer step": (OrderedDict([(1, world_size)]), {"outer_optimizers": {1: nesterov}}),
        "outer + bf16": (OrderedDict([(1, world_size)]), {"outer_optimizers": {1: nesterov}, "comm_dtypes": {1: torch.bfloat16}}),
        "int8 level": (OrderedDict([(1, world_size)]), {"comm_dtypes": {1: torch.int8}}),
        # FSDP2 over pairs of ranks: each rank averages its shards with the ranks holding the same slice.
        "sharded world": (OrderedDict([(1, world_size)]), {"sharded": True}),
    }
    results = {}
    for name, (hierarchy, options) in cases.items():
        sharded = bool(options.pop("sharded", False))
        if sharded and world_size % 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = TorchAverager(hierarchy, warmup_steps=0) if not options and not sharded else None
            ours = HierarchicalModelAverager(hierarchy, warmup_steps=0, **options)
        ours.step = 1  # skip step 0, which the top level would take
        group = ours.period_process_group_dict[1]
        model_ours = make_model(args.params)
        if sharded:
            model_ours = shard_model(model_ours, world_size)
            ours.average_parameters(model_ours.parameters())  # makes the slice groups and flattens the shards
            group = ours._slices.group(1)  # the ranks holding this rank's slice
        n = sum(p.to_local().numel() if sharded else p.numel() for p in model_ours.parameters())
        floor_buffer = torch.randn(n) * 0.03
        timings: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        calls = {
            "a": lambda: dist.all_reduce(floor_buffer, group=group),
            "c": lambda: ours.average_parameters(model_ours.parameters()),
        }
        if options.get("comm_dtypes") == {1: torch.bfloat16} and "outer_optimizers" not in options:
            # The bf16 level's transfers alone (two all_to_alls of half the bytes, no casts or sums):
            # separates what the wire costs from what the extra passes over memory cost.
            wire_out, wire_in = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
            calls["b"] = lambda: (dist.all_to_all_single(wire_in, wire_out, group=group), dist.all_to_all_single(wire_out, wire_in, group=group))
            # ... and its passes over memory alone (no transfers), each timed on its own.
            for stage, fn in compressed_passes(n, dist.get_world_size(group)).items():
                calls[stage] = fn
                timings[stage] = []
        if theirs is not None:
            theirs.step = 1
            model_theirs = make_model(args.params)
            calls["b"] = lambda: theirs.average_parameters(model_theirs.parameters())
        for fn in calls.values():  # first calls: connections, our one-time flattening and anchor start
            fn()
        pointers = storage_pointers(model_ours, ours)
        for _ in range(args.iters):
            for key, fn in calls.items():
                timings[key].append(time_call(fn, dist.group.WORLD))
        # No per-call allocation: after the first call parameters and the averager's buffers stay put.
        same_storage = pointers == storage_pointers(model_ours, ours)
        results[name] = ({k: statistics.median(v) if v else float("nan") for k, v in timings.items()}, n, same_storage)
        del model_ours, ours, theirs, calls
    if rank == 0:
        print(f"world size {world_size}, gloo on CPU, {args.iters} interleaved calls each, median ms per call")
        print(f"{'step':<15}{'params':>12}{'(a) floor':>12}{'(b) torch':>12}{'(c) ours':>12}{'c/a':>8}{'c/b':>8}")
        for name, (m, n, _) in results.items():  # sharded world: n is one rank's shard
            print(f"{name:<15}{n:>12,}{m['a']:>12.2f}{m['b']:>12.2f}{m['c']:>12.2f}{m['c'] / m['a']:>8.2f}{m['c'] / m['b']:>8.2f}")
        m = results["bf16 level"][0]
        print(f"bf16 level: its two bf16 all_to_alls alone take {m['b']:.2f} ms = {m['b'] / m['a']:.2f}x (a) (shown as (b) in its row)")
        stages = ("produce", "reduce", "consume")
        passes = sum(m[s] for s in stages)
        print(
            "bf16 level: its passes over memory alone, no transfers: "
            + ", ".join(f"{s} {m[s]:.2f} ms = {m[s] / m['a']:.2f}x (a)" for s in stages)
            + f"; together {passes:.2f} ms = {passes / m['a']:.2f}x (a); "
            f"transfers + passes = {(m['b'] + passes) / m['a']:.2f}x (a), measured (c) = {m['c'] / m['a']:.2f}x (a)"
        )
        least = m["b"] + m["least_read"] + m["least_write"]
        print(
            "bf16 level: least possible here = its transfers + one pass reading anchor and parameters "
            f"({m['least_read']:.2f} ms) + one pass writing the parameters ({m['least_write']:.2f} ms), "
            f"all ranks at once = {least:.2f} ms = {least / m['a']:.2f}x (a) (goal <= 0.6x)"
        )
        reused = all(same for _, _, same in results.values())
        print(f"(c) kept parameters, anchors, outer state and wire buffers in the same storage across all timed calls: {reused}")
    dist.destroy_process_group()


def step_time_worker(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    """``--step-time``: a training loop's seconds per step with the world level overlapped by tau steps, or absent."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import train_lm

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=300)
    )
    cfg = train_lm.GPTConfig(context=args.context, width=args.width, layers=args.layers, heads=4)
    wire = {"fp32": None, "bf16": torch.bfloat16, "int8": torch.int8}[args.comm_dtype]
    nesterov = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True, foreach=True)
    generator = torch.Generator().manual_seed(rank)

    def variant(tau: int | None) -> dict:
        torch.manual_seed(0)
        model = train_lm.TinyGPT(cfg)
        averager = None
        if tau is not None:
            options = {"outer_optimizers": {args.period: nesterov}, "comm_dtypes": {args.period: wire} if wire else {}}
            if tau:
                options["sync_delays"] = {args.period: tau}
            averager = HierarchicalModelAverager({args.period: "world"}, warmup_steps=0, **options)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return {"model": model, "averager": averager, "optimizer": optimizer, "seconds": []}

    def train_period(v: dict) -> None:
        for _ in range(args.period):
            tokens = torch.randint(0, 256, (args.batch_size, cfg.context + 1), generator=generator)
            v["optimizer"].zero_grad(set_to_none=True)
            train_lm.lm_loss(v["model"], tokens[:, :-1], tokens[:, 1:]).backward()
            v["optimizer"].step()
            if v["averager"] is not None:
                v["averager"].average_parameters(v["model"].parameters())

    names = ["no world level"] + [f"tau {tau}" for tau in args.taus]
    variants = {"no world level": variant(None), **{f"tau {tau}": variant(tau) for tau in args.taus}}
    for v in variants.values():  # untimed: the anchors' start at step 0, allocations, connections
        train_period(v)
    for _ in range(args.periods):
        for name in names:
            v = variants[name]
            dist.barrier()
            start = time.perf_counter()
            train_period(v)
            # Every rank's period ends before the clock stops: the slowest rank's time is the loop's.
            done = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(done, op=dist.ReduceOp.MAX)
            v["seconds"].append(done.item() / args.period)
    n = sum(p.numel() for p in variants["no world level"]["model"].parameters())
    if rank == 0:
        base = statistics.median(variants["no world level"]["seconds"])
        print(
            f"world size {world_size}, gloo on CPU, byte-level GPT width {args.width} x {args.layers} layers ({n:,} parameters), "
            f"batch {args.batch_size} x {args.context}; world level every {args.period} steps, outer Nesterov, "
            f"{args.comm_dtype} wire; {args.periods} interleaved periods each, median ms per step"
        )
        print(f"{'loop':<16}{'ms/step':>10}{'world level cost':>18}")
        for name in names:
            median = statistics.median(variants[name]["seconds"])
            cost = "" if name == names[0] else f"{(median / base - 1) * 100:+.1f} %"
            print(f"{name:<16}{median * 1e3:>10.1f}{cost:>18}")
    dist.destroy_process_group()


SHAPED_LINK_ENV = "ELASTIC_HSGD_BENCH_SHAPED_LINK"


def run_over_shaped_link(rate: str) -> None:
    """Re-run this script in a new network namespace whose loopback carries at most ``rate``."""
    import shutil
    import subprocess

    missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"--link-rate {rate} needs {missing} (util-linux, iproute2) and root; run without it.")
    if os.environ.get(SHAPED_LINK_ENV) != rate:
        env = dict(os.environ, **{SHAPED_LINK_ENV: rate})
        completed = subprocess.run(["unshare", "-n", sys.executable, *sys.argv], env=env)
        raise SystemExit(completed.returncode)
    # Inside the namespace: its own loopback, down until brought up, shaped for every rank at once.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "4mb", "latency", "500ms"], check=True)
    print(f"loopback of a new network namespace shaped to {rate} (token bucket), shared by all ranks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--link-rate", help="e.g. 4gbit: measure over a loopback shaped to this rate (root, iproute2)")
    loop = parser.add_argument_group("--step-time: a training loop with an overlapped world level")
    loop.add_argument("--step-time", action="store_true", help="measure step time with sync_delays instead of averaging cost")
    loop.add_argument("--taus", type=int, nargs="+", default=[0, 1, 2, 4], help="sync delays of the world level")
    loop.add_argument("--period", type=int, default=8, help="world level period")
    loop.add_argument("--periods", type=int, default=6, help="timed periods per variant")
    loop.add_argument("--comm-dtype", choices=("fp32", "bf16", "int8"), default="bf16")
    loop.add_argument("--width", type=int, default=256)
    loop.add_argument("--layers", type=int, default=4)
    loop.add_argument("--context", type=int, default=64)
    loop.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if any(tau < 0 or tau >= args.period for tau in args.taus):
        parser.error(f"--taus {args.taus}: every delay must be in 0 .. --period - 1 ({args.period - 1})")
    if args.link_rate:
        run_over_shaped_link(args.link_rate)

    port = free_port()
    mp.spawn(step_time_worker if args.step_time else worker, args=(args.world_size, port, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
