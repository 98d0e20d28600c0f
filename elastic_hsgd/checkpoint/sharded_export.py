"""Sharded checkpoints in the CLI: ``export``'s reader, and the layout ``inspect`` shows.

:class:`ShardedReader` is :mod:`.export`'s :class:`~.export.ReplicaReader` for
a checkpoint of DTensor state. A **replica** is one full copy of the model:
the ``j``-th saved rank of every box (saved ranks holding the same box are
its replicas, in rank order), named by its first saved rank. Reading tensor
``key`` of a replica assembles the full tensor from that replica's boxes by
ranged reads (:func:`~.sharded.plan_slice`), one tensor in memory at a time.

Example::

    >>> # xdoctest: +SKIP("needs a sharded checkpoint")
    >>> reader = ShardedReader.open(storage, record)     # None for an unsharded checkpoint
    >>> reader.replicas                                   # 2 replicas x 2 shards, named by saved rank
    [0, 2]
    >>> reader.read("0.weight", 2).shape                  # replica 2's full tensor
    torch.Size([13, 5])
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..sharding import Slice
from .layout import FORMAT_VERSION, CommitRecord
from .rank_index import RankIndex, TensorSpec, rank_file, read_index, read_range
from .sharded import coalesce, is_record, parse_record, plan_slice
from .sharded_load import saved_tree
from .storage import CheckpointError, Storage

def module_entries(tree: Any) -> dict[str, dict[str, Any]]:
    """The state entries that are module state dicts of tensors or sharded records, by name."""
    out = {}
    for name, node in (tree.items() if isinstance(tree, dict) else []):
        if isinstance(name, str) and isinstance(node, dict) and node and all(
            isinstance(k, str) and (isinstance(v, TensorSpec) or (is_record(v) and isinstance(v.get("local"), TensorSpec))) for k, v in node.items()
        ):
            out[name] = node
    return out


def describe_layouts(index: RankIndex, saved_rank: int = 0) -> dict[str, dict[str, Any]]:
    """Per entry holding sharded tensors: their count, global bytes and shapes, and each layout's mesh and placements.

    For ``inspect``: what one rank file (``saved_rank``'s) says.
    """
    out: dict[str, dict[str, Any]] = {}
    if any(not isinstance(ref, str) for ref in index.tensors):
        return out  # a file of version 0.1 (tensors by number): nothing was sharded then
    tree = saved_tree(index)
    for name, node in (tree.items() if isinstance(tree, dict) else []):
        found = _records(node, ())
        if not found:
            continue
        layouts: dict[str, int] = {}
        shapes, global_bytes = {}, 0
        for path, record in found:
            spec = record["local"]
            layout = parse_record(record, spec.shape if isinstance(spec, TensorSpec) else (), saved_rank, f"{name}/{path}")
            shown = f"{', '.join(layout.placements)} over {layout.mesh.describe()}"
            layouts[shown] = layouts.get(shown, 0) + 1
            global_bytes += math.prod(layout.global_shape) * spec.dtype.itemsize
            if len(shapes) < 64:
                shapes["/".join(map(str, path))] = list(layout.global_shape)
        out[name] = {"sharded_tensors": len(found), "global_bytes": global_bytes, "layouts": layouts, "global_shapes": shapes}
    return out


def _records(node: Any, path: tuple) -> list[tuple[tuple, dict]]:
    if is_record(node):
        return [(path, node)]
    if isinstance(node, dict):
        return [f for k, v in node.items() for f in _records(v, (*path, k))]
    if isinstance(node, (list, tuple)):
        return [f for i, v in enumerate(node) for f in _records(v, (*path, i))]
    return []


class ShardedReader:
    """The model's full tensors, replica by replica, from a checkpoint of DTensor state (see the module docstring)."""

    @classmethod
    def open(cls, storage: Storage, record: CommitRecord, *, rank: int | None = None, entry: str | None = None) -> "ShardedReader | None":
        """The reader, or ``None`` if saved rank 0's file holds no sharded model entry."""
        if record.format != FORMAT_VERSION:
            return None  # version 0.1 saved no DTensor state
        first = _open(storage, record, 0)
        entries = module_entries(saved_tree(first[1]))
        if not any(is_record(v) for node in entries.values() for v in node.values()):
            return None
        return cls(storage, record, first, entries, rank, entry)

    def __init__(self, storage: Storage, record: CommitRecord, first: tuple[str, RankIndex], entries: dict, rank: int | None, entry: str | None) -> None:
        self.storage = storage
        sharded = sorted(n for n, node in entries.items() if any(is_record(v) for v in node.values()))
        if entry is None:
            entry = "model" if "model" in entries else sharded[0] if len(sharded) == 1 else None
        if entry not in entries:
            raise CheckpointError(f"choose the model entry with --entry NAME: the sharded module state entries are {sharded}, all module states {sorted(entries)}")
        self.entry = entry
        self.files: dict[int, tuple[str, dict[str, Any]]] = {}
        for saved_rank in range(record.world_size):
            path, index = first if saved_rank == 0 else _open(storage, record, saved_rank)
            node = module_entries(saved_tree(index)).get(entry)
            if node is None:
                raise CheckpointError(f"saved rank {saved_rank} of step {record.step} has no module state entry {entry!r}")
            self.files[saved_rank] = (path, node)
        self.keys = list(self.files[0][1])
        self.layouts: dict[str, dict[int, tuple[Slice, TensorSpec]]] = {}
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.whole: set[str] = set()
        for key in self.keys:
            self._layout(key)
        self.replica_of, names = self._replicas()
        self.replicas = [rank] if rank is not None else names

    def _layout(self, key: str) -> None:
        held: dict[int, tuple[Slice, TensorSpec]] = {}
        shapes = set()
        for saved_rank, (_, node) in self.files.items():
            value = node.get(key)
            if value is None:
                raise CheckpointError(f"model tensor {key!r} is missing from saved rank {saved_rank}'s file")
            spec = value["local"] if is_record(value) else value
            if is_record(value):
                layout = parse_record(value, spec.shape, saved_rank, f"saved rank {saved_rank}, {self.entry}/{key}")
                held[saved_rank], shape = (layout.box, spec), layout.global_shape
            else:
                held[saved_rank], shape = (Slice((0,) * len(spec.shape), spec.shape), spec), spec.shape
            shapes.add((spec.dtype, tuple(shape)))
        if len(shapes) != 1:
            raise CheckpointError(f"model tensor {key!r} differs between saved ranks: {sorted(map(str, shapes))}")
        self.layouts[key], (self.specs[key],) = held, shapes
        if all(box.numel == math.prod(self.specs[key][1]) for box, _ in held.values()):
            self.whole.add(key)  # every saved rank holds all of it: read from the replica's own file

    def _replicas(self) -> tuple[dict[int, int], list[int]]:
        """Saved rank -> replica index (its place among its box's holders), and each replica's name."""
        replica_of: dict[int, int] = {}
        counts = set()
        for key, held in self.layouts.items():
            if key in self.whole:
                continue
            by_box: dict[Slice, list[int]] = {}
            for saved_rank, (box, _) in sorted(held.items()):
                by_box.setdefault(box, []).append(saved_rank)
            counts.update(len(ranks) for box, ranks in by_box.items() if box.numel)
            for ranks in by_box.values():
                for j, saved_rank in enumerate(ranks):
                    if replica_of.setdefault(saved_rank, j) != j:
                        raise CheckpointError(f"saved rank {saved_rank} is replica {replica_of[saved_rank]} of one tensor and {j} of {key!r}")
        if len(counts) > 1:
            raise CheckpointError(f"the model's boxes have different numbers of saved replicas: {sorted(counts)}")
        if not counts:  # nothing is split: every saved rank is a replica
            return {r: r for r in self.files}, list(self.files)
        return replica_of, [min(r for r, j in replica_of.items() if j == i) for i in range(counts.pop())]

    def read(self, key: str, replica: int) -> torch.Tensor:
        """The full tensor ``key`` of the replica saved rank ``replica`` belongs to."""
        dtype, shape = self.specs[key]
        held = self.layouts[key]
        if key in self.whole:
            mine = {replica: held[replica][0]}
        else:
            mine = {r: box for r, (box, _) in held.items() if self.replica_of.get(r) == self.replica_of[replica]}
        out = torch.empty(shape, dtype=dtype)
        for piece in plan_slice(Slice((0,) * len(shape), shape), mine, shape, dtype.itemsize, f"{self.entry}/{key}"):
            (read,) = piece.reads
            path, spec = self.files[read.saved_rank][0], held[read.saved_rank][1]
            data = bytearray()
            for start, nbytes, parts in coalesce(read.ranges):
                span = read_range(self.storage, path, spec.start + start, nbytes)
                for offset, size in parts:
                    data += span[offset : offset + size]
            if data:
                index = tuple(slice(o, o + n) for o, n in zip(piece.box.offset, piece.box.size))
                out[index] = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(piece.box.size)
        return out


def _open(storage: Storage, record: CommitRecord, saved_rank: int) -> tuple[str, RankIndex]:
    path, size = rank_file(storage, record, saved_rank)
    return path, read_index(storage, path, size, record.format)
