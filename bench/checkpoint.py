"""Checkpoint cost: how long training is blocked by a sync and an async save,
and save throughput against a plain fsspec write of the same bytes.

    python bench/checkpoint.py [--url /tmp/elastic-hsgd-bench] [--mb 100] [--repeats 5]

One process (world size 1) and a model of about ``--mb`` MB of fp32
parameters; the plain write gets exactly the bytes a save writes. Everything
is measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import fsspec
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from elastic_hsgd import CheckpointManager  # noqa: E402
from elastic_hsgd.checkpoint.state import capture, serialize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="fsspec URL (default: a temporary local folder)")
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--storage-options", default="{}", help="JSON for fsspec, e.g. an S3 endpoint_url")
    args = parser.parse_args()
    url = args.url or tempfile.mkdtemp(prefix="elastic-hsgd-bench-")

    width = 1024
    layers = max(1, round(args.mb * 2**20 / 4 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    state = {"model": model}
    options = json.loads(args.storage_options)
    manager = CheckpointManager(url, keep=2, include_rng=False, storage_options=options)
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

    runs = [run_plain, run_sync, run_async]
    for repeat in range(args.repeats):
        # Rotate the order: page-cache writeback of one write slows the next.
        for fn in runs[repeat % 3 :] + runs[: repeat % 3]:
            fn()
    fs.rm_file(plain_path)
    manager.close()

    med = statistics.median
    print(f"checkpoint of {nbytes / 1e6:.1f} MB to {url}, median of {args.repeats}")
    print(f"  plain fsspec write of the same bytes : {med(plain) * 1e3:8.1f} ms  ({nbytes / med(plain) / 1e6:7.1f} MB/s)")
    print(f"  sync save (blocks training)          : {med(sync) * 1e3:8.1f} ms  ({nbytes / med(sync) / 1e6:7.1f} MB/s)")
    print(f"  async save, training blocked         : {med(async_block) * 1e3:8.1f} ms")
    print(f"  async save, until committed          : {med(async_total) * 1e3:8.1f} ms")
    print(f"  async blocking / sync save           : {med(async_block) / med(sync):8.3f}   (target <= 0.10)")
    print(f"  sync throughput / plain write        : {med(plain) / med(sync):8.3f}   (target >= 0.80)")


if __name__ == "__main__":
    main()
