"""Decoding a rank file: extra memory and time of ``format.decode`` against ``safetensors.torch.load``.

    python bench/format_decode.py [--mb 400]

Writes a file of ``--mb`` MB of fp32 tensors, then in two fresh processes reads
it into one buffer and decodes it, reporting the peak RSS beyond the buffer.
``safetensors.torch.load`` takes ``bytes`` and copies every tensor out of them.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from elastic_hsgd.checkpoint import format as fileformat  # noqa: E402


def _decode(path: str, how: str) -> None:
    buffer = bytearray(os.path.getsize(path))
    with open(path, "rb") as f:
        f.readinto(buffer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if how == "format":
        tree = fileformat.decode(buffer)
    else:
        import safetensors.torch

        tree = safetensors.torch.load(bytes(buffer))
    elapsed = time.perf_counter() - start
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"  {how:<20}: {elapsed * 1e3:8.1f} ms, extra peak RSS {extra:6.0f} MiB ({len(tree)} entries)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=400.0)
    parser.add_argument("--decode", choices=["format", "safetensors"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode:
        _decode(args.path, args.decode)
        return
    path = os.path.join(tempfile.mkdtemp(prefix="elastic-hsgd-bench-format-"), "rank_00000.safetensors")
    tensors = {f"layer{i}": torch.randn(1024, 1024) for i in range(max(1, round(args.mb / 4)))}
    with open(path, "wb") as f:
        for chunk in fileformat.encode(tensors):
            f.write(chunk)
    print(f"decoding a {os.path.getsize(path) / 2**20:.0f} MiB rank file already read into one buffer")
    for how in ("format", "safetensors"):
        subprocess.run([sys.executable, __file__, "--decode", how, "--path", path], check=True)
    os.remove(path)


if __name__ == "__main__":
    main()
