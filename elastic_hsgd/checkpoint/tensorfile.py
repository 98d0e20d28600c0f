"""Read-only: the rank file format of elastic_hsgd 0.1 (``.ehsgd``), kept to read old checkpoints.

New files are written by :mod:`.format` (safetensors).

::

    b"EHSGDCK1" | uint64 LE header length | header JSON | padding | tensor bytes

The header holds the tree (dicts with any plain keys, lists, tuples, None,
bool, int, float, str) with each tensor replaced by an index into a table of
dtype, shape, offset and length. Loading parses JSON and copies bytes: nothing
in a checkpoint can make the loader import or call code.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

MAGIC = b"EHSGDCK1"
ALIGN = 64
_DTYPES = {str(dt).removeprefix("torch."): dt for dt in vars(torch).values() if isinstance(dt, torch.dtype)}


def _pad(n: int) -> int:
    return -n % ALIGN


def decode(data: bytes) -> Any:
    """Parse a file written by :func:`encode`; ``ValueError`` if it is anything else."""
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError("not an elastic_hsgd tensor file (bad magic); refusing to interpret it")
    if len(data) < len(MAGIC) + 8:
        raise ValueError("truncated header")
    (header_len,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    if start + header_len > len(data):
        raise ValueError("truncated header")
    header = json.loads(bytes(data[start : start + header_len]))
    base = start + header_len + _pad(start + header_len)
    tensors = [_tensor(data, base, entry) for entry in header["tensors"]]
    return _decode(header["tree"], tensors)


def _tensor(data: bytes, base: int, entry: dict) -> torch.Tensor:
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"unknown dtype {entry['dtype']!r}")
    shape = [int(s) for s in entry["shape"]]
    numel = 1
    for s in shape:
        numel *= s
    nbytes, offset = int(entry["nbytes"]), base + int(entry["offset"])
    if nbytes != numel * dtype.itemsize or offset + nbytes > len(data) or offset < base:
        raise ValueError(f"tensor entry {entry} does not fit the file")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(memoryview(data)[offset : offset + nbytes]), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _decode(node: Any, tensors: list[torch.Tensor]) -> Any:
    if not isinstance(node, dict):
        return node
    (tag, body), = node.items()
    if tag == "T":
        return tensors[body]
    if tag == "D":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    if tag == "L":
        return [_decode(v, tensors) for v in body]
    if tag == "U":
        return tuple(_decode(v, tensors) for v in body)
    raise ValueError(f"unknown node tag {tag!r}")

