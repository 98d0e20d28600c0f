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

from .storage import CheckpointError

MAGIC = b"EHSGDCK1"
ALIGN = 64
_DTYPES = {str(dt).removeprefix("torch."): dt for dt in vars(torch).values() if isinstance(dt, torch.dtype)}


class LegacyFormatError(CheckpointError, ValueError):
    """Bytes that are not a well-formed 0.1 rank file (a :class:`CheckpointError`, and a ``ValueError`` as before)."""


# What hostile bytes can make the decoder below raise; each becomes a LegacyFormatError.
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError, RuntimeError, struct.error)


def _pad(n: int) -> int:
    return -n % ALIGN


def decode(data: bytes) -> Any:
    """Parse a 0.1 rank file; :class:`LegacyFormatError` (a ``CheckpointError``) if it is anything else.

    Every refusal, whatever a hostile header holds (missing keys, bad indices,
    deep nesting), is that one error naming what is wrong.
    """
    try:
        return _decode_file(data)
    except LegacyFormatError:
        raise
    except _MALFORMED as exc:
        raise LegacyFormatError(f"not a valid elastic_hsgd 0.1 (.ehsgd) rank file: {type(exc).__name__}: {str(exc)[:200]}") from None


def _decode_file(data: bytes) -> Any:
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError("not an elastic_hsgd tensor file (bad magic); refusing to interpret it")
    if len(data) < len(MAGIC) + 8:
        raise ValueError("truncated header")
    (header_len,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    if start + header_len > len(data):
        raise ValueError("truncated header")
    header = json.loads(bytes(data[start : start + header_len]))
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise ValueError(f"header {str(header)[:100]} is not an object with a list of tensors")
    base = start + header_len + _pad(start + header_len)
    tensors = [_tensor(data, base, entry) for entry in header["tensors"]]
    return _decode(header["tree"], tensors)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor(data: bytes, base: int, entry: dict) -> torch.Tensor:
    if not isinstance(entry, dict):
        raise ValueError(f"tensor entry {str(entry)[:100]} is not an object")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"unknown dtype {str(entry['dtype'])[:50]!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > 64 or not all(_count(s) for s in shape):
        raise ValueError(f"tensor shape {str(shape)[:100]} is not a list of sizes")
    numel = 1
    for s in shape:
        numel *= s
    if not _count(entry["nbytes"]) or not _count(entry["offset"]):
        raise ValueError(f"tensor entry {str(entry)[:200]}: offset and nbytes must be non-negative ints")
    nbytes, offset = entry["nbytes"], base + entry["offset"]
    if nbytes != numel * dtype.itemsize or offset + nbytes > len(data) or offset < base:
        raise ValueError(f"tensor entry {entry} does not fit the file")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(memoryview(data)[offset : offset + nbytes]), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _decode(node: Any, tensors: list[torch.Tensor]) -> Any:
    if not isinstance(node, dict):
        return node
    if len(node) != 1:
        raise ValueError(f"tree node {str(node)[:100]} does not have exactly one tag")
    (tag, body), = node.items()
    if tag == "T":
        if not _count(body) or body >= len(tensors):
            raise ValueError(f"tree refers to tensor {str(body)[:50]}, the file holds {len(tensors)}")
        return tensors[body]
    if tag in ("D", "L", "U") and not isinstance(body, list):
        raise ValueError(f"tree node {tag!r} holds {type(body).__name__}, not a list")
    if tag == "D":
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in body):
            raise ValueError(f"dict items {str(body)[:100]} are not [key, value] pairs")
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    if tag == "L":
        return [_decode(v, tensors) for v in body]
    if tag == "U":
        return tuple(_decode(v, tensors) for v in body)
    raise ValueError(f"unknown node tag {tag!r}")

