"""The one pickle-free byte format for state: a safetensors file with the tree as JSON.

::

    uint64 LE header length | header JSON (space-padded to 8 bytes) | tensor bytes

The header is a standard safetensors header: one entry per tensor, under a
path-like name (``model/0.weight``, ``optimizer/state/0/exp_avg``), with
``dtype``, ``shape`` and ``data_offsets``; ``__metadata__["tree"]`` holds the
nested state (dicts with any plain keys, lists, tuples, None, bool, int,
float, str) as JSON, each tensor replaced by ``{"T": name}``. Any safetensors
reader opens the file and lists the tensors::

    >>> # xdoctest: +SKIP("writes a file")
    >>> from safetensors import safe_open
    >>> with safe_open("rank_00000.safetensors", framework="pt") as f:
    ...     print(list(f.keys()))

:func:`encode` returns the file as chunks; tensor chunks are views of the
tensors' own memory (no serialization copy). :func:`decode` parses one
buffer, checks every bound before touching data, and builds tensors as views
of that buffer (no second copy; ``safetensors.torch.load`` would copy each
tensor out of a ``bytes``). Decoding parses JSON and maps bytes: nothing in a
file can make it import or call code.

Example::

    >>> import torch
    >>> chunks = encode({"w": torch.arange(3.0), "step": 7, "names": ("a", None)})
    >>> tree = decode(bytearray(b"".join(bytes(c) for c in chunks)))
    >>> tree["w"].tolist(), tree["step"], tree["names"]
    ([0.0, 1.0, 2.0], 7, ('a', None))
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any

import torch

#: ``__metadata__["format"]`` of files this module writes.
TREE_FORMAT = "elastic_hsgd.tree/1"
#: The largest header accepted (safetensors' own limit).
MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in [
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
]:
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code
TORCH_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPES.items()}


class FormatError(ValueError):
    """Bytes that are not a well-formed file of this format."""


# -- encoding -------------------------------------------------------------


class _Names:
    """Unique, path-like tensor names."""

    def __init__(self) -> None:
        self.used: set[str] = {"__metadata__"}

    def claim(self, path: str) -> str:
        name, n = path, 1
        while name in self.used:
            n += 1
            name = f"{path}#{n}"
        self.used.add(name)
        return name


def _encode(value: Any, tensors: dict[str, torch.Tensor], names: _Names, path: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        if value.dtype not in DTYPES:
            raise TypeError(f"cannot checkpoint tensor {path!r} of dtype {value.dtype}: supported dtypes are {sorted(map(str, DTYPES))}.")
        name = names.claim(path or "tensor")
        tensors[name] = value
        return {"T": name}
    if isinstance(value, dict):
        pairs = []
        for k, v in value.items():
            if isinstance(k, torch.Tensor) or not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise TypeError(f"cannot checkpoint key {k!r} of {path!r}: keys must be plain values.")
            pairs.append([_encode(k, tensors, names, path), _encode(v, tensors, names, f"{path}/{k}" if path else str(k))])
        return {"D": pairs}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, names, f"{path}/{i}") for i, v in enumerate(value)]
        return {"L" if isinstance(value, list) else "U": items}
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _encode(value.item(), tensors, names, path)
    raise TypeError(
        f"cannot checkpoint {path or 'state'!r} of type {type(value).__name__}: state_dict values must be "
        "tensors, numbers, strings, None, or dicts/lists/tuples of them."
    )


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    host = host.contiguous()
    if host.numel() == 0:
        return memoryview(b"")
    return host.reshape(-1).view(torch.uint8).numpy().data


def encode(tree: Any) -> list[bytes | memoryview]:
    """The file as a list of chunks; tensor chunks are views of tensor memory."""
    if sys.byteorder != "little":
        raise RuntimeError("checkpoint files are little-endian; big-endian hosts are not supported.")
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors, _Names(), "")
    # Widest dtypes first: every tensor then starts at a multiple of its item
    # size, so decoding can view the buffer without copying to align.
    order = sorted(tensors, key=lambda n: -tensors[n].dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": {"format": TREE_FORMAT, "tree": json.dumps(encoded, separators=(",", ":"))}}
    chunks: list[bytes | memoryview] = []
    offset = 0
    for name in order:
        data = _bytes_of(tensors[name])
        header[name] = {"dtype": DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape), "data_offsets": [offset, offset + data.nbytes]}
        chunks.append(data)
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return [struct.pack("<Q", len(raw)) + raw, *chunks]


# -- decoding -------------------------------------------------------------


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(f"{what} is {value!r}, not a non-negative integer")
    return value


def _table(header: Any, data_bytes: int) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Check every tensor entry against the data section; nothing is read yet."""
    if not isinstance(header, dict):
        raise FormatError(f"header is a {type(header).__name__}, not an object")
    table = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: entry {str(entry)[:200]} is not {{dtype, shape, data_offsets}}")
        dtype = TORCH_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise FormatError(f"tensor {name!r}: unknown dtype {str(entry['dtype'])[:50]!r}; known: {sorted(TORCH_DTYPES)}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or len(shape) > 64:
            raise FormatError(f"tensor {name!r}: shape {str(shape)[:200]} is not a list of at most 64 sizes")
        shape = [_int(s, f"tensor {name!r} size") for s in shape]
        if any(s >= 2**63 for s in shape):
            raise FormatError(f"tensor {name!r}: a size in {str(shape)[:200]} does not fit an int64")
        if 0 in shape and math.prod(s for s in shape if s) >= 2**63:  # an empty [0, 2**40, 2**40]: its strides overflow
            raise FormatError(f"tensor {name!r}: shape {str(shape)[:200]} has more elements per slice than an int64 counts")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise FormatError(f"tensor {name!r}: data_offsets {str(offsets)[:200]} is not [begin, end]")
        begin, end = (_int(o, f"tensor {name!r} offset") for o in offsets)
        if not begin <= end <= data_bytes:
            raise FormatError(f"tensor {name!r}: data_offsets [{begin}, {end}] outside the {data_bytes} data bytes")
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise FormatError(f"tensor {name!r}: shape {shape} of {entry['dtype']} does not take {end - begin} bytes")
        table[name] = (dtype, shape, begin, end)
    # As safetensors requires: the tensors tile the data section exactly, so none overlap.
    position = 0
    for name, (_, _, begin, end) in sorted(table.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            raise FormatError(f"tensor {name!r} starts at {begin}, expected {position} (gap or overlap)")
        position = end
    if position != data_bytes:
        raise FormatError(f"tensors cover {position} of the {data_bytes} data bytes")
    return table


def _view(buffer: memoryview, start: int, dtype: torch.dtype, shape: list[int], nbytes: int) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=start)
    if start % dtype.itemsize:
        flat = flat.clone()  # a foreign file with unaligned data: copy this tensor only
    return flat.view(dtype).reshape(shape)


def read_header(buffer: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """The parsed header and where the data section starts; checks the length prefix."""
    view = memoryview(buffer).cast("B")
    if view.nbytes < 8:
        raise FormatError(f"{view.nbytes} bytes is too short for a safetensors file")
    (length,) = struct.unpack_from("<Q", view, 0)
    if length > MAX_HEADER_BYTES or 8 + length > view.nbytes:
        raise FormatError(f"header length {length} does not fit a file of {view.nbytes} bytes (limit {MAX_HEADER_BYTES})")
    try:
        header = json.loads(bytes(view[8 : 8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"header is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise FormatError(f"header is a {type(header).__name__}, not an object")
    return header, 8 + length


def decode(buffer: bytearray | memoryview) -> Any:
    """Parse a file written by :func:`encode`; :class:`FormatError` if it is anything else.

    Tensors are views of ``buffer`` (pass a writable buffer, e.g. a
    ``bytearray`` the file was read into; ``bytes`` are copied once).
    """
    if isinstance(buffer, bytes):
        buffer = bytearray(buffer)
    view = memoryview(buffer).cast("B")
    if view.readonly:
        view = memoryview(bytearray(view))
    header, start = read_header(view)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != TREE_FORMAT or not isinstance(metadata.get("tree"), str):
        raise FormatError(f"not an elastic_hsgd state file: __metadata__ {str(metadata)[:200]} has no {TREE_FORMAT} tree")
    table = _table(header, view.nbytes - start)
    try:
        tree = json.loads(metadata["tree"])
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"tree is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    tensors = {name: _view(view, start + b, dtype, shape, e - b) for name, (dtype, shape, b, e) in table.items()}
    try:
        return _decode(tree, tensors)
    except FormatError:
        raise
    except (TypeError, ValueError, RecursionError) as exc:
        raise FormatError(f"malformed tree: {type(exc).__name__}: {str(exc)[:200]}") from None


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or len(node) != 1:
        raise FormatError(f"malformed tree node {str(node)[:100]}")
    ((tag, body),) = node.items()
    if tag == "T":
        if not isinstance(body, str) or body not in tensors:
            raise FormatError(f"tree refers to tensor {str(body)[:100]!r}, which the file does not hold")
        return tensors[body]
    if tag == "D" and isinstance(body, list):
        out = {}
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2:
                raise FormatError(f"malformed dict item {str(pair)[:100]}")
            key = _decode(pair[0], tensors)
            if isinstance(key, (torch.Tensor, list, dict)):
                raise FormatError(f"dict key {str(pair[0])[:100]} is not a plain value")
            out[key] = _decode(pair[1], tensors)
        return out
    if tag in ("L", "U") and isinstance(body, list):
        items = [_decode(v, tensors) for v in body]
        return items if tag == "L" else tuple(items)
    raise FormatError(f"unknown tree node {tag!r}")
