"""A pickle-free file format for nested state: a JSON tree plus raw tensor bytes.

::

    b"EHSGDCK1" | uint64 LE header length | header JSON | padding | tensor bytes

The header holds the tree (dicts with any plain keys, lists, tuples, None,
bool, int, float, str) with each tensor replaced by an index into a table of
dtype, shape, offset and length. Loading parses JSON and copies bytes: nothing
in a checkpoint can make the loader import or call code. Writing hands the
tensors' own memory to the writer, so a save costs no serialization copy.
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


def _encode(value: Any, tensors: list[torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {"T": len(tensors) - 1}
    if isinstance(value, dict):
        return {"D": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"L" if isinstance(value, list) else "U": items}
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _encode(value.item(), tensors, where)
    raise TypeError(
        f"cannot checkpoint {where} of type {type(value).__name__}: state_dict values must be tensors, "
        "numbers, strings, None, or dicts/lists/tuples of them."
    )


def encode(tree: Any) -> list[bytes | memoryview]:
    """The file as a list of chunks; tensor chunks are views of tensor memory."""
    tensors: list[torch.Tensor] = []
    encoded = _encode(tree, tensors, "state")
    table: list[dict[str, Any]] = []
    raw: list[bytes | memoryview] = []
    offset = 0
    for tensor in tensors:
        host = tensor.detach()
        if host.device.type != "cpu":
            host = host.cpu()
        host = host.contiguous()
        data = host.reshape(-1).view(torch.uint8).numpy().data if host.numel() else memoryview(b"")
        table.append({"dtype": str(host.dtype).removeprefix("torch."), "shape": list(host.shape), "offset": offset, "nbytes": data.nbytes})
        raw.append(data)
        raw.append(b"\0" * _pad(data.nbytes))
        offset += data.nbytes + _pad(data.nbytes)
    header = json.dumps({"tree": encoded, "tensors": table}, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack("<Q", len(header)) + header
    return [prefix + b"\0" * _pad(len(prefix)), *raw]


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

