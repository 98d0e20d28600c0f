"""Sharded (DTensor) state in rank files: the layout record, and the pure reshard plan.

Each rank saves its local shard of a DTensor beside its layout, as one plain
dict in the file's JSON tree (:mod:`.format`)::

    {"__dtensor__": "elastic_hsgd.dtensor/1", "local": <the local shard>,
     "global_shape": [13, 5], "offset": [7, 0], "size": [6, 5],
     "mesh": {"shape": [2], "ranks": [0, 1], "dims": ["shard"]}, "placements": ["Shard(0)"]}

A reader that wants a slice of the global tensor (its new rank's shard) asks
:func:`plan_slice` which saved shards overlap it: for each overlapping box,
the saved ranks holding it (the saved replicas, to be averaged) and the byte
ranges of that box inside each one's shard. A safetensors tensor is row-major
and contiguous, so a box that spans every dim but the first of a shard is one
range; any other box is one range per run of its innermost partial dim
(:func:`byte_ranges`). Nothing here reads a file.

Example: 13 rows saved as 7 + 6 over two ranks (and replicated on two more),
resumed as four shards of 4, 4, 4, 1 rows; new rank 1 wants rows 4..7::

    >>> from elastic_hsgd.sharding import Slice
    >>> saved = {0: Slice((0, 0), (7, 5)), 1: Slice((7, 0), (6, 5)), 2: Slice((0, 0), (7, 5)), 3: Slice((7, 0), (6, 5))}
    >>> for piece in plan_slice(Slice((4, 0), (4, 5)), saved, (13, 5), itemsize=4):
    ...     print(piece.box, [(r.saved_rank, r.ranges) for r in piece.reads])
    Slice(offset=(4, 0), size=(3, 5)) [(0, ((80, 60),)), (2, ((80, 60),))]
    Slice(offset=(7, 0), size=(1, 5)) [(1, ((0, 20),)), (3, ((0, 20),))]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

from ..sharding import Mesh, Slice, check_placements, local_slice
from .storage import CheckpointError

RECORD_KEY = "__dtensor__"
RECORD_FORMAT = "elastic_hsgd.dtensor/1"
_FIELDS = {RECORD_KEY, "local", "global_shape", "offset", "size", "mesh", "placements"}
#: Byte ranges of one saved shard closer than this are read as one span (fewer requests, a little more read).
COALESCE_GAP_BYTES = 256 << 10


@dataclass(frozen=True)
class ShardLayout:
    """Where one saved shard sits: the global shape, its box, and the mesh and placements that put it there."""

    global_shape: tuple[int, ...]
    box: Slice
    mesh: Mesh
    placements: tuple[str, ...]

    def record(self, local: Any) -> dict[str, Any]:
        """The dict saved in the tree, ``local`` (the shard's tensor) beside the layout."""
        return {
            RECORD_KEY: RECORD_FORMAT,
            "local": local,
            "global_shape": list(self.global_shape),
            "offset": list(self.box.offset),
            "size": list(self.box.size),
            "mesh": {"shape": list(self.mesh.shape), "ranks": list(self.mesh.ranks), "dims": list(self.mesh.dims) if self.mesh.dims else None},
            "placements": list(self.placements),
        }

    def describe(self) -> str:
        """``[13, 5] Shard(0) over mesh (shard=2) of ranks [0, 1]``, for messages and ``inspect``."""
        return f"{list(self.global_shape)} {', '.join(self.placements)} over {self.mesh.describe()}"


def is_record(value: Any) -> bool:
    """Whether ``value`` (a decoded tree node) is a saved shard's layout record."""
    return isinstance(value, dict) and RECORD_KEY in value


def _sizes(value: Any, what: str, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise CheckpointError(f"{what} is {str(value)[:100]}, not a list of sizes")
    if length is not None and len(value) != length:
        raise CheckpointError(f"{what} {value} has {len(value)} dims, expected {length}")
    return tuple(value)


def parse_record(record: Any, shard_shape: Sequence[int], saved_rank: int, where: str) -> ShardLayout:
    """Check a layout record against its shard's tensor (``shard_shape``) and its own mesh.

    A record whose fields are malformed, whose size is not its tensor's shape,
    whose box leaves the global shape, or whose mesh would place ``saved_rank``
    elsewhere is a :class:`~.storage.CheckpointError` naming ``where``.
    """
    if not isinstance(record, dict) or set(record) != _FIELDS or record[RECORD_KEY] != RECORD_FORMAT:
        keys = sorted(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{where}: a sharded tensor's record has fields {keys}, expected {sorted(_FIELDS)} ({RECORD_FORMAT})")
    global_shape = _sizes(record["global_shape"], f"{where}: global_shape")
    box = Slice(_sizes(record["offset"], f"{where}: offset", len(global_shape)), _sizes(record["size"], f"{where}: size", len(global_shape)))
    if tuple(shard_shape) != box.size:
        raise CheckpointError(f"{where}: the saved shard has shape {list(shard_shape)} but its record says size {list(box.size)}")
    if not box.within(global_shape):
        raise CheckpointError(f"{where}: the shard at offset {list(box.offset)} of size {list(box.size)} leaves the global shape {list(global_shape)}")
    mesh_node = record["mesh"]
    try:
        if not isinstance(mesh_node, dict) or set(mesh_node) != {"shape", "ranks", "dims"}:
            raise TypeError(f"mesh {str(mesh_node)[:100]} is not {{shape, ranks, dims}}")
        dims = mesh_node["dims"]
        if dims is not None and not (isinstance(dims, list) and all(isinstance(d, str) for d in dims)):
            raise TypeError(f"mesh dims {str(dims)[:100]} are not names")
        mesh = Mesh(_sizes(mesh_node["shape"], "mesh shape"), _sizes(mesh_node["ranks"], "mesh ranks"), tuple(dims) if dims else None)
        if not isinstance(record["placements"], list):
            raise TypeError(f"placements {str(record['placements'])[:100]} are not a list")
        placements = check_placements("the tensor", global_shape, mesh, record["placements"])
        expected = local_slice(global_shape, mesh, placements, saved_rank)
    except (TypeError, ValueError, CheckpointError) as exc:
        raise CheckpointError(f"{where}: malformed layout: {exc}") from None
    if expected != box:
        raise CheckpointError(
            f"{where}: saved rank {saved_rank} claims the box at offset {list(box.offset)} of size {list(box.size)}, "
            f"but its mesh and placements ({', '.join(placements)} over {mesh.describe()}) give offset "
            f"{list(expected.offset)} size {list(expected.size)}"
        )
    return ShardLayout(global_shape, box, mesh, placements)


# -- the reshard plan ---------------------------------------------------------


@dataclass(frozen=True)
class Read:
    """The byte ranges of a box inside one saved rank's shard: ``(offset from the shard's first byte, nbytes)``,
    in the box's row-major order (their bytes, concatenated, are the box)."""

    saved_rank: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)


@dataclass(frozen=True)
class Piece:
    """One box of the requested slice and its reads, one per saved replica holding it (to be averaged)."""

    box: Slice
    reads: tuple[Read, ...]


def byte_ranges(shard: Slice, box: Slice, itemsize: int) -> list[tuple[int, int]]:
    """The byte ranges of ``box`` (global coordinates) inside a row-major ``shard``.

    >>> byte_ranges(Slice((0, 0), (4, 6)), Slice((1, 0), (2, 6)), 4)   # whole rows: one range
    [(24, 48)]
    >>> byte_ranges(Slice((0, 0), (4, 6)), Slice((1, 2), (2, 3)), 4)   # part of each row: one range a row
    [(32, 12), (56, 12)]
    """
    if box.intersect(shard) != box:
        raise ValueError(f"{box} is not inside {shard}")
    ndim = len(shard.size)
    if ndim == 0:
        return [(0, itemsize)]
    if box.numel == 0:
        return []
    start = [b - s for b, s in zip(box.offset, shard.offset)]
    strides = [math.prod(shard.size[d + 1 :]) for d in range(ndim)]
    k = ndim - 1
    while k > 0 and box.size[k] == shard.size[k]:
        k -= 1
    run = box.size[k] * strides[k] * itemsize
    ranges = []
    for index in product(*(range(start[d], start[d] + box.size[d]) for d in range(k))):
        element = sum(i * s for i, s in zip(index, strides)) + start[k] * strides[k]
        ranges.append((element * itemsize, run))
    return ranges


def plan_slice(
    target: Slice, saved: Mapping[int, Slice], global_shape: Sequence[int], itemsize: int, what: str = "tensor", *, ranges: bool = True
) -> list[Piece]:
    """The reads that make up ``target`` from the saved shards (``saved``: saved rank -> its box).

    Saved ranks with the same box are replicas of it, all read (their mean is
    the value). The distinct saved boxes must tile ``target``: overlapping
    boxes, or a part of ``target`` no saved rank holds, are a
    :class:`~.storage.CheckpointError` naming ``what``. ``ranges=False``
    checks the tiling only (each read's ranges left empty).
    """
    if not target.within(global_shape):
        raise CheckpointError(f"{what}: the requested box {target} leaves the global shape {list(global_shape)}")
    holders: dict[Slice, list[int]] = {}
    for rank in sorted(saved):
        box = saved[rank]
        if not box.within(global_shape):
            raise CheckpointError(f"{what}: saved rank {rank}'s box {box} leaves the global shape {list(global_shape)}")
        holders.setdefault(box, []).append(rank)
    if target.numel == 0:
        return []
    pieces: list[Piece] = []
    for box, ranks in holders.items():
        overlap = box.intersect(target)
        if overlap is None:
            continue
        for other in pieces:
            if other.box.intersect(overlap) is not None:
                theirs = [r.saved_rank for r in other.reads]
                raise CheckpointError(
                    f"{what}: saved ranks {ranks[:8]} (box {box}) and {theirs[:8]} hold overlapping parts of the tensor: "
                    "a rank file's layout is corrupt"
                )
        found = tuple(byte_ranges(box, overlap, itemsize)) if ranges else ()
        reads = tuple(Read(rank, found) for rank in ranks)
        pieces.append(Piece(overlap, reads))
    covered = sum(piece.box.numel for piece in pieces)
    if covered != target.numel:
        raise CheckpointError(
            f"{what}: the saved shards hold {covered} of the {target.numel} elements of box {target} "
            f"(saved boxes {[b for b in list(holders)[:8]]}): a part of the tensor is missing from every rank file"
        )
    return pieces


def coalesce(ranges: Sequence[tuple[int, int]], max_gap: int = COALESCE_GAP_BYTES) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Ranges (in increasing order) merged into spans to read: ``(start, nbytes, [(offset in span, nbytes), ...])``.

    >>> coalesce([(0, 8), (16, 8), (1000, 8)], max_gap=100)
    [(0, 24, [(0, 8), (16, 8)]), (1000, 8, [(0, 8)])]
    """
    spans: list[tuple[int, int, list[tuple[int, int]]]] = []
    for start, nbytes in ranges:
        if spans and start - (spans[-1][0] + spans[-1][1]) <= max_gap and start >= spans[-1][0] + spans[-1][1]:
            first, _, parts = spans[-1]
            parts.append((start - first, nbytes))
            spans[-1] = (first, start + nbytes - first, parts)
        else:
            spans.append((start, nbytes, [(0, nbytes)]))
    return spans
