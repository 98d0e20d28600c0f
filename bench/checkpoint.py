"""Checkpoint cost: how long training is blocked by a sync and an async save,
save throughput against a plain fsspec write of the same bytes, and what a
resume at a new world size (mean of the saved replicas) costs against a
resume at the same world size; for the node-local tier, how long its save
blocks (per MB of rank state) and how long a resume takes from it against
one from ``--url``.

    python bench/checkpoint.py [--url /tmp/elastic-hsgd-bench] [--mb 100] [--repeats 5] [--local-url /dev/shm/x]
    python bench/checkpoint.py --resume [--saved-world 4] [--new-world 2] [--resume-mb 25] [--repeats 3]
    python bench/checkpoint.py --sharded [--saved-layout 2x2] [--layouts 2x2,1x4,2x1] [--sharded-mb 32] [--repeats 3]

One process (world size 1) and a model of about ``--mb`` MB of fp32
parameters; the plain write gets exactly the bytes a save writes. With
``--resume``: ``--saved-world`` real gloo processes save different replicas
(model and Adam state, about ``--resume-mb`` MB of parameters each), then the
same checkpoint is loaded by ``--saved-world`` processes (each reads its own
file) and by ``--new-world`` processes (each reads its share of the files and
all_reduces the sums), alternately. With ``--sharded``: an FSDP2 model (and
AdamW state) of about ``--sharded-mb`` MB is saved by ``--saved-layout``
(replicas x shards, one gloo process per rank), then resumed at each of
``--layouts`` (the same layout first: each rank reads its own file; another
number of replicas or another shard layout: each rank reads only the byte
ranges of the saved shards that overlap its new boxes), alternately; it prints
each layout's median time against the same layout's and the bytes each rank
read (all, and of the sharded tensors' boxes). Everything is measured side by
side in one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time

import fsspec
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from elastic_hsgd import CheckpointManager  # noqa: E402
from elastic_hsgd.checkpoint.state import capture, serialize  # noqa: E402


def _replica(mb: float, seed: int) -> dict:
    """A model and Adam state of about ``mb`` MB of fp32 parameters, different per ``seed``."""
    torch.manual_seed(seed)
    width = 1024
    layers = max(1, round(mb * 2**20 / 4 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def _resume_worker(rank: int, world: int, port: int, url: str, options: str, mb: float, repeats: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    manager = CheckpointManager(url, include_rng=False, storage_options=json.loads(options), overwrite=True)  # scratch data
    state = _replica(mb, seed=rank)
    if repeats == 0:
        manager.save(1, state)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        manager.load(1, state)
        dist.barrier()
        times.append(time.perf_counter() - start)
    manager.close()
    dist.destroy_process_group()
    results.put((rank, times))


def _spawn(target, world: int, *args) -> dict[int, object]:
    """``target(rank, world, port, *args, results)`` in ``world`` spawned processes; each rank's result."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, world, port, *args, results)) for rank in range(world)]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=1800) for _ in range(world))
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"a {target.__name__} process exited with {proc.exitcode}")
    return got


def _in_processes(world: int, *args) -> list[float]:
    return _spawn(_resume_worker, world, *args)[0]


def resume_cost(args) -> None:
    url = args.url or tempfile.mkdtemp(prefix="elastic-hsgd-bench-resume-")
    old, new = args.saved_world, args.new_world
    _in_processes(old, url, args.storage_options, args.resume_mb, 0)  # save: one file per saved replica
    fs, root = fsspec.core.url_to_fs(url, **json.loads(args.storage_options))
    per_file = sum(fs.size(f) for f in fs.find(root) if f.endswith(".safetensors")) / old
    same, other = [], []
    for _ in range(args.resume_rounds):  # alternate, so both see the same machine state
        same += _in_processes(old, url, args.storage_options, args.resume_mb, args.repeats)
        other += _in_processes(new, url, args.storage_options, args.resume_mb, args.repeats)
    med = statistics.median
    share = -(-old // new)
    print(f"resume of a checkpoint saved by {old} ranks ({per_file / 1e6:.1f} MB per rank file) at {url}, median of {len(same)} loads")
    print(f"  same world ({old} ranks, each reads its own file)            : {med(same) * 1e3:8.1f} ms")
    print(f"  new world ({new} ranks, mean of {old} replicas, <= {share} files each) : {med(other) * 1e3:8.1f} ms")
    print(f"  new-world / same-world resume time                        : {med(other) / med(same):8.2f}")


def _layout(text: str) -> tuple[int, int]:
    replicas, _, shards = text.partition("x")
    if not (replicas.isdigit() and shards.isdigit()) or int(replicas) < 1 or int(shards) < 1:
        raise SystemExit(f"layout {text!r} is not REPLICASxSHARDS, e.g. 2x2")
    return int(replicas), int(shards)


def _sharded_state(layout: tuple[int, int], mb: float, seed: int) -> dict:
    """An FSDP2 model of about ``mb`` MB over the shard dim of a ``layout`` mesh, and AdamW after one step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    width = 512
    layers = max(1, round(mb * 2**20 / 4 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", layout, mesh_dim_names=("replicate", "shard"))
    for layer in model:
        fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).pow(2).mean().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def _sharded_worker(rank: int, world: int, port: int, url: str, layout: tuple[int, int], mb: float, repeats: int, results) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from elastic_hsgd.checkpoint.sharded_load import load_sharded_step
    from elastic_hsgd.checkpoint.storage import CheckpointError, Storage
    from elastic_hsgd.checkpoint.tiers.cloud import CloudTier
    from elastic_hsgd.collectives import Peers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    state = _sharded_state(layout, mb, seed=rank // layout[1])  # each replica its own values
    if repeats == 0:
        with CheckpointManager(url, include_rng=False, overwrite=True) as manager:  # scratch data
            manager.save(1, state)
        dist.destroy_process_group()
        results.put((rank, ([], 0, 0)))
        return
    peers = Peers.own_gloo_group(timedelta(seconds=600), CheckpointError)
    storage = Storage(url)
    tier = CloudTier(storage, peers, keep=3)
    times, loaded, record = [], None, None
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        reader = tier.reader(1)
        loaded, record = load_sharded_step(state, reader, peers, storage=storage), reader.record
        dist.barrier()
        times.append(time.perf_counter() - start)
    tier.close()
    peers.release()
    dist.destroy_process_group()
    # An exact resume fetches its own whole file (not by range): count that file.
    own = next(f.bytes for f in record.files if f.name == f"rank_{rank:05d}.safetensors") if loaded.exact else 0
    # bytes_read counts one load (the last): each repeat reads the same ranges.
    results.put((rank, (times, own or loaded.bytes_read, loaded.shard_bytes_read)))


def _sharded_in_processes(layout: tuple[int, int], *args) -> dict[int, tuple]:
    return _spawn(_sharded_worker, layout[0] * layout[1], args[0], layout, *args[1:])


def sharded_resume_cost(args) -> None:
    """Resume across shard layouts versus the same layout: time ratio and bytes read per rank."""
    url = args.url or tempfile.mkdtemp(prefix="elastic-hsgd-bench-sharded-")
    saved = _layout(args.saved_layout)
    layouts = [saved] + [lay for lay in map(_layout, args.layouts.split(",")) if lay != saved]
    _sharded_in_processes(saved, url, args.sharded_mb, 0)
    fs, root = fsspec.core.url_to_fs(url)
    per_file = sum(fs.size(f) for f in fs.find(root) if f.endswith(".safetensors")) / (saved[0] * saved[1])
    times: dict[tuple[int, int], list[float]] = {lay: [] for lay in layouts}
    read: dict[tuple[int, int], tuple[float, float]] = {}
    for _ in range(args.resume_rounds):  # alternate, so every layout sees the same machine state
        for lay in layouts:
            got = _sharded_in_processes(lay, url, args.sharded_mb, args.repeats)
            times[lay] += got[0][0]
            read[lay] = (statistics.mean(g[1] for g in got.values()), statistics.mean(g[2] for g in got.values()))
    med = statistics.median
    base = med(times[saved])
    print(f"sharded resume of a checkpoint saved as {saved[0]} x {saved[1]} ({per_file / 1e6:.1f} MB per rank file) at {url}, "
          f"median of {len(times[saved])} loads")
    print(f"  {'resumed as':<12} {'ranks':>5} {'ms':>9} {'/ same':>7} {'MB read/rank':>13} {'of it boxes':>12}")
    for lay in layouts:
        kind = "same layout" if lay == saved else ("fewer/more replicas" if lay[1] == saved[1] else "resharded")
        all_mb, box_mb = read[lay][0] / 1e6, read[lay][1] / 1e6
        print(f"  {lay[0]} x {lay[1]:<8} {lay[0] * lay[1]:>5} {med(times[lay]) * 1e3:9.1f} {med(times[lay]) / base:7.2f} "
              f"{all_mb:13.2f} {box_mb:12.2f}   {kind}")
    print("  (same layout: each rank reads its own whole file; otherwise only byte ranges, the boxes' from every saved replica)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="fsspec URL (default: a temporary local folder)")
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--storage-options", default="{}", help="JSON for fsspec, e.g. an S3 endpoint_url")
    parser.add_argument("--resume", action="store_true", help="measure resume at a new world size instead")
    parser.add_argument("--saved-world", type=int, default=4)
    parser.add_argument("--new-world", type=int, default=2)
    parser.add_argument("--resume-mb", type=float, default=25.0, help="MB of fp32 parameters per replica")
    parser.add_argument("--resume-rounds", type=int, default=3, help="alternating rounds of fresh processes; --repeats loads each")
    parser.add_argument("--local-url", default=None, help="local tier folder (default: a new folder in /dev/shm, else the temp dir)")
    parser.add_argument("--sharded", action="store_true", help="measure a sharded (FSDP2) resume across shard layouts instead")
    parser.add_argument("--saved-layout", default="2x2", help="--sharded: REPLICASxSHARDS that saves")
    parser.add_argument("--layouts", default="2x2,1x4,2x1", help="--sharded: comma-separated REPLICASxSHARDS to resume as")
    parser.add_argument("--sharded-mb", type=float, default=32.0, help="--sharded: MB of fp32 parameters per replica")
    args = parser.parse_args()
    if args.sharded:
        sharded_resume_cost(args)
        return
    if args.resume:
        resume_cost(args)
        return
    url = args.url or tempfile.mkdtemp(prefix="elastic-hsgd-bench-")
    local_url = args.local_url or tempfile.mkdtemp(prefix="elastic-hsgd-bench-local-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)

    width = 1024
    layers = max(1, round(args.mb * 2**20 / 4 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    state = {"model": model}
    options = json.loads(args.storage_options)
    manager = CheckpointManager(url, keep=2, include_rng=False, storage_options=options, overwrite=True)  # scratch: --url may hold an earlier run's
    data = b"".join(bytes(c) for c in serialize(capture(state, include_rng=False)))
    nbytes = len(data)
    fs, root = fsspec.core.url_to_fs(url, **options)
    plain_path = f"{root.rstrip('/')}/plain.bin"

    plain, sync, async_block, async_total = [], [], [], []
    step = 0

    def run_plain() -> None:
        start = time.perf_counter()
        with fs.open(plain_path, "wb") as f:
            f.write(data)
        plain.append(time.perf_counter() - start)

    def run_sync() -> None:
        nonlocal step
        step += 1
        start = time.perf_counter()
        manager.save(step, state)
        sync.append(time.perf_counter() - start)

    def run_async() -> None:
        nonlocal step
        step += 1
        start = time.perf_counter()
        manager.save(step, state, blocking=False)
        async_block.append(time.perf_counter() - start)
        manager.wait()
        async_total.append(time.perf_counter() - start)

    copy_target, memcpy = bytearray(nbytes), []

    def run_memcpy() -> None:  # the floor of any staging copy: one memcpy of the same bytes
        start = time.perf_counter()
        memoryview(copy_target)[:] = data
        memcpy.append(time.perf_counter() - start)

    tiered = CheckpointManager(
        url, keep=2, include_rng=False, storage_options=options, local_url=local_url, local_every=1, local_keep=2, overwrite=True
    )
    local_block, local_total = [], []

    def run_local() -> None:
        nonlocal step
        step += 1
        start = time.perf_counter()
        tiered.save_local(step, state)
        local_block.append(time.perf_counter() - start)
        tiered.local.wait()
        local_total.append(time.perf_counter() - start)

    runs = [run_plain, run_sync, run_async, run_local, run_memcpy]
    for repeat in range(args.repeats):
        # Rotate the order: page-cache writeback of one write slows the next.
        for fn in runs[repeat % len(runs) :] + runs[: repeat % len(runs)]:
            fn()
    fs.rm_file(plain_path)

    # Resume: the newest step is in both tiers; one manager reads it from the local tier, one from --url.
    step += 1
    manager.save(step, state)
    tiered.save_local(step, state)
    tiered.local.wait()
    resume_local, resume_cloud = [], []
    for repeat in range(max(3, args.repeats // 2)):
        for reader, times in ((tiered, resume_local), (manager, resume_cloud))[:: 1 if repeat % 2 else -1]:
            start = time.perf_counter()
            loaded = reader.load_latest(state)
            times.append(time.perf_counter() - start)
            assert loaded == step and reader.last_source == ("local" if reader is tiered else "cloud"), (loaded, reader.last_source)
    tiered.close()  # a closed manager no longer loads: close both after the resumes
    manager.close()

    med = statistics.median
    print(f"checkpoint of {nbytes / 1e6:.1f} MB to {url}, median of {args.repeats}")
    print(f"  plain fsspec write of the same bytes : {med(plain) * 1e3:8.1f} ms  ({nbytes / med(plain) / 1e6:7.1f} MB/s)")
    print(f"  sync save (blocks training)          : {med(sync) * 1e3:8.1f} ms  ({nbytes / med(sync) / 1e6:7.1f} MB/s)")
    print(f"  async save, training blocked         : {med(async_block) * 1e3:8.1f} ms")
    print(f"  async save, until committed          : {med(async_total) * 1e3:8.1f} ms")
    print(f"  async blocking / sync save           : {med(async_block) / med(sync):8.3f}   (target <= 0.10)")
    print(f"  sync throughput / plain write        : {med(plain) / med(sync):8.3f}   (target >= 0.80)")
    mb = nbytes / 2**20
    print(f"local tier at {local_url} (world size 1: no buddy copy), median of {args.repeats}")
    print(f"  local save, training blocked         : {med(local_block) * 1e3:8.1f} ms  ({med(local_block) * 1e3 / mb:.3f} ms per MB; target <= 1)")
    print(f"  one memcpy of the same bytes         : {med(memcpy) * 1e3:8.1f} ms  ({med(memcpy) * 1e3 / mb:.3f} ms per MB)")
    print(f"  local save blocked / memcpy          : {med(local_block) / med(memcpy):8.3f}")
    print(f"  local save, until committed          : {med(local_total) * 1e3:8.1f} ms")
    print(f"  resume (load_latest) from local tier : {med(resume_local) * 1e3:8.1f} ms")
    print(f"  resume (load_latest) from --url      : {med(resume_cloud) * 1e3:8.1f} ms")
    print(f"  resume local / resume from --url     : {med(resume_local) / med(resume_cloud):8.3f}")


if __name__ == "__main__":
    main()
