"""Reading rank files by byte range: a file's tree and tensor table from its header, then one tensor at a time.

A rank file's header lists every tensor's dtype, shape and byte range, and its
tree (the safetensors ``__metadata__``, :mod:`.format`) says which tensors form
which state entry. Nothing here decodes a whole file: :func:`read_index` reads
the header only, :func:`read_tensor` one tensor's bytes, and every range a
header claims is checked against the file's size before it is read. Files of
version 0.1 (``.ehsgd``, :mod:`.tensorfile`) are read the same way.

Example::

    >>> # xdoctest: +SKIP("needs a checkpoint")
    >>> path, size = rank_file(storage, record, rank=0)
    >>> index = read_index(storage, path, size, record.format)
    >>> model = index.module_state(index.entries()["model"])   # {key: TensorSpec}
    >>> weight = read_tensor(storage, path, model["0.weight"])
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from . import format as fileformat
from .layout import CommitRecord, step_dir_name
from .storage import CheckpointError, Storage

_EHSGD_MAGIC = b"EHSGDCK1"  # version 0.1 rank files (:mod:`.tensorfile`), read-only
_EHSGD_ALIGN = 64
_EHSGD_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


@dataclass(frozen=True)
class TensorSpec:
    """Where one saved tensor's bytes are in its rank file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class RankIndex:
    """A rank file's tree (JSON nodes, tensors as ``{"T": ref}``) and its tensors' specs by ref."""

    tree: Any
    tensors: dict[Any, TensorSpec]

    def entries(self) -> dict[str, Any]:
        """The top-level state entries (``model``, ``optimizer``, ...) as tree nodes."""
        if not (isinstance(self.tree, dict) and isinstance(self.tree.get("D"), list)):
            raise CheckpointError("the rank file's tree is not a dict of state entries")
        return {key: value for key, value in _pairs(self.tree) if isinstance(key, str)}

    def refs(self, node: Any) -> list[Any]:
        """Every tensor ref under ``node``, without recursion (a deep tree cannot overflow the stack)."""
        found, stack = [], [node]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict) or len(node) != 1:
                continue
            ((tag, body),) = node.items()
            if tag == "T" and body in self.tensors:
                found.append(body)
            elif tag == "D" and isinstance(body, list):
                stack.extend(item for pair in body if isinstance(pair, list) for item in pair)
            elif tag in ("L", "U") and isinstance(body, list):
                stack.extend(body)
        return found

    def module_state(self, node: Any) -> dict[str, TensorSpec] | None:
        """``node`` as a module state dict (string keys, every value a tensor), else ``None``."""
        if not (isinstance(node, dict) and isinstance(node.get("D"), list) and node["D"]):
            return None
        out = {}
        for key, value in _pairs(node):
            ref = value.get("T") if isinstance(value, dict) and len(value) == 1 else None
            if not isinstance(key, str) or ref not in self.tensors or key in out:
                return None
            out[key] = self.tensors[ref]
        return out


def _pairs(node: dict) -> list[tuple[Any, Any]]:
    return [(p[0], p[1]) for p in node["D"] if isinstance(p, list) and len(p) == 2]


# -- reading rank files by byte range --------------------------------------------


def read_range(storage: Storage, path: str, start: int, nbytes: int) -> bytes:
    """Bytes ``[start, start + nbytes)`` of ``path``: one ranged read, retried by the storage's policy."""
    if nbytes == 0:
        return b""
    where = storage.fs.unstrip_protocol(path)
    data = storage.policy.call(f"reading {where}", lambda: storage.fs.cat_file(path, start=start, end=start + nbytes))
    if len(data) != nbytes:
        raise CheckpointError(f"{where}: read {len(data)} bytes at offset {start}, expected {nbytes} (truncated file?)")
    return data


def read_tensor(storage: Storage, path: str, spec: TensorSpec) -> torch.Tensor:
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=spec.dtype)
    flat = torch.frombuffer(bytearray(read_range(storage, path, spec.start, spec.nbytes)), dtype=torch.uint8)
    return flat.view(spec.dtype).reshape(spec.shape)


def read_index(storage: Storage, path: str, size: int, record_format: int) -> RankIndex:
    """The tree and tensor specs of one rank file, from its header only."""
    where = storage.fs.unstrip_protocol(path)
    try:
        return _ehsgd_index(storage, path, size) if record_format == 1 else _safetensors_index(storage, path, size)
    except (fileformat.FormatError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CheckpointError(f"{where}: unreadable header: {exc}") from exc


def _safetensors_index(storage: Storage, path: str, size: int) -> RankIndex:
    if size < 8:
        raise ValueError(f"{size} bytes is too short for a safetensors file")
    (length,) = struct.unpack("<Q", read_range(storage, path, 0, 8))
    if length > fileformat.MAX_HEADER_BYTES or 8 + length > size:
        raise ValueError(f"header length {length} does not fit a file of {size} bytes")
    header, data_start = fileformat.read_header(read_range(storage, path, 0, 8 + length))
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != fileformat.TREE_FORMAT or not isinstance(metadata.get("tree"), str):
        raise ValueError(f"not an elastic_hsgd state file: no {fileformat.TREE_FORMAT} tree in __metadata__")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2:
            raise ValueError(f"tensor {name!r}: entry {str(entry)[:200]} has no [begin, end] data_offsets")
        begin, end = entry["data_offsets"]
        tensors[name] = _spec(name, fileformat.TORCH_DTYPES.get(str(entry.get("dtype"))), entry.get("shape"), data_start, begin, end, size)
    return RankIndex(json.loads(metadata["tree"]), tensors)


def _ehsgd_index(storage: Storage, path: str, size: int) -> RankIndex:
    prefix = read_range(storage, path, 0, 16) if size >= 16 else b""
    if prefix[:8] != _EHSGD_MAGIC:
        raise ValueError("not an elastic_hsgd 0.1 rank file (bad magic)")
    (length,) = struct.unpack_from("<Q", prefix, 8)
    if length > fileformat.MAX_HEADER_BYTES or 16 + length > size:
        raise ValueError(f"header length {length} does not fit a file of {size} bytes")
    header = json.loads(read_range(storage, path, 16, length))
    base = 16 + length + (-(16 + length) % _EHSGD_ALIGN)
    tensors = {}
    for i, entry in enumerate(header["tensors"]):
        offset, nbytes = entry["offset"], entry["nbytes"]
        end = offset + nbytes if isinstance(offset, int) and isinstance(nbytes, int) else None
        tensors[i] = _spec(i, _EHSGD_DTYPES.get(str(entry["dtype"])), entry["shape"], base, offset, end, size)
    return RankIndex(header["tree"], tensors)


def _spec(name: Any, dtype: torch.dtype | None, shape: Any, data_start: int, begin: Any, end: Any, size: int) -> TensorSpec:
    """A checked spec: nothing a header claims is used before it is known to fit the file."""
    if dtype is None:
        raise ValueError(f"tensor {name!r}: unknown dtype")
    if not isinstance(shape, list) or len(shape) > 64 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"tensor {name!r}: shape {str(shape)[:200]} is not a list of sizes")
    if not all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)) or not 0 <= begin <= end <= size - data_start:
        raise ValueError(f"tensor {name!r}: data range [{begin}, {end}] is outside the file")
    if math.prod(shape) * dtype.itemsize != end - begin:
        raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} does not take {end - begin} bytes")
    return TensorSpec(dtype, tuple(shape), data_start + begin, end - begin)


def rank_file(storage: Storage, record: CommitRecord, rank: int) -> tuple[str, int]:
    """Path and size of a saved rank's file, its size checked against the commit record."""
    entry = record.file_for_rank(rank)
    path = storage.path(step_dir_name(record.step), entry.name)
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise CheckpointError(f"{storage.fs.unstrip_protocol(path)} is missing") from None
    if size != entry.bytes:
        raise CheckpointError(
            f"{storage.fs.unstrip_protocol(path)} is {size} bytes, its commit record says {entry.bytes}: "
            "run `python -m elastic_hsgd verify`."
        )
    return path, size
