"""Pure DTensor slice topology: which part of a tensor each rank holds, and who else holds it.

A DTensor parameter is described by plain data: its global shape, its mesh
(:class:`Mesh`: shape, the global ranks in mesh order as ``mesh.mesh.tolist()``
gives them, and the dim names) and its placements, one per mesh dim,
``"Shard(d)"`` or ``"Replicate()"`` (torch placement objects are accepted too).
From these, without any process group:

- :func:`local_slice`: the slice of the global tensor a rank holds (offset and
  size per dim), by torch's uneven chunking rule (``torch.chunk``: 13 rows over
  2 ranks are 7 + 6, 3 rows over 4 ranks are 1 + 1 + 1 + 0);
- :func:`slice_replicas`: the sets of ranks that hold the same slice, the
  ranks a rank averages its local shard with;
- :func:`check_levels`: whether each level of a hierarchy groups whole replicas
  (a ``ValueError`` naming the level, the mesh and the fix if not), and which
  levels would average a single replica (returned, for the caller to warn once
  and skip).

Example (FSDP2 over the shard dim of a 2 x 2 mesh, an uneven 13 x 5 weight)::

    >>> mesh = Mesh.from_ranks([[0, 1], [2, 3]], ("replicate", "shard"))
    >>> local_slice((13, 5), mesh, ["Replicate()", "Shard(0)"], rank=3)
    Slice(offset=(7, 0), size=(6, 5))
    >>> sorted(slice_replicas((13, 5), mesh, ["Replicate()", "Shard(0)"]).values())
    [(0, 2), (1, 3)]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .hierarchy import Level, contiguous_blocks

REPLICATE = "Replicate()"
_SHARD = re.compile(r"^Shard\((?:dim=)?(\d+)\)$")


@dataclass(frozen=True)
class Slice:
    """A box of a global tensor: ``offset`` and ``size`` per dim.

    >>> Slice((0, 2), (4, 3)).intersect(Slice((2, 0), (4, 4)))
    Slice(offset=(2, 2), size=(2, 2))
    """

    offset: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    @property
    def end(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offset, self.size))

    def intersect(self, other: "Slice") -> "Slice | None":
        """The common box, ``None`` when it is empty (also when either box is empty)."""
        if len(other.offset) != len(self.offset):
            raise ValueError(f"{self} and {other} have different numbers of dims")
        begin = tuple(max(a, b) for a, b in zip(self.offset, other.offset))
        stop = tuple(min(a, b) for a, b in zip(self.end, other.end))
        if any(e <= b for b, e in zip(begin, stop)):
            return None
        return Slice(begin, tuple(e - b for b, e in zip(begin, stop)))

    def within(self, global_shape: Sequence[int]) -> bool:
        """Whether the box lies inside a tensor of ``global_shape``."""
        return len(global_shape) == len(self.size) and all(
            o >= 0 and s >= 0 and o + s <= g for o, s, g in zip(self.offset, self.size, global_shape)
        )


@dataclass(frozen=True)
class Mesh:
    """A device mesh as plain data: its shape, global ranks in row-major mesh order, dim names.

    >>> Mesh.from_ranks([[0, 1], [2, 3]], ("replicate", "shard")).coordinate(2)
    (1, 0)
    """

    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    dims: tuple[str, ...] | None = None

    @classmethod
    def from_ranks(cls, ranks: Any, dims: Sequence[str] | None = None) -> "Mesh":
        """From nested lists of global ranks (``DeviceMesh.mesh.tolist()``)."""
        shape: list[int] = []
        level = ranks
        while isinstance(level, (list, tuple)):
            shape.append(len(level))
            level = level[0] if level else None
        flat = list(ranks)
        for _ in range(len(shape) - 1):
            flat = [r for row in flat for r in row]
        return cls(tuple(shape), tuple(int(r) for r in flat), tuple(dims) if dims is not None else None)

    def __post_init__(self) -> None:
        if not self.shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.shape):
            raise TypeError(f"mesh shape {self.shape} is not a list of positive sizes")
        if len(self.ranks) != math.prod(self.shape) or len(set(self.ranks)) != len(self.ranks):
            raise TypeError(f"mesh of shape {list(self.shape)} has ranks {list(self.ranks)[:16]}: expected {math.prod(self.shape)} distinct ranks")
        if self.dims is not None and len(self.dims) != len(self.shape):
            raise TypeError(f"mesh of shape {list(self.shape)} has dim names {list(self.dims)}: one name per dim")

    def coordinate(self, rank: int) -> tuple[int, ...]:
        """``rank``'s position in the mesh; ``ValueError`` if it is not in it."""
        try:
            index = self.ranks.index(rank)
        except ValueError:
            raise ValueError(f"rank {rank} is not in {self.describe()}") from None
        coordinate = []
        for size in reversed(self.shape):
            index, position = divmod(index, size)
            coordinate.append(position)
        return tuple(reversed(coordinate))

    def describe(self) -> str:
        """``mesh (replicate=2, shard=2) of ranks [0, 1, 2, 3]``, for messages."""
        names = self.dims or tuple(f"dim{i}" for i in range(len(self.shape)))
        shown = list(self.ranks[:16]) + (["..."] if len(self.ranks) > 16 else [])
        return f"mesh ({', '.join(f'{n}={s}' for n, s in zip(names, self.shape))}) of ranks {shown}"


def placement_text(placement: Any, name: str = "tensor") -> str:
    """``placement`` as plain text, ``"Shard(d)"`` or ``"Replicate()"``; ``TypeError`` for anything else.

    Accepts torch's ``Shard``/``Replicate`` objects or that text. ``Partial``
    (a pending reduction) and ``_StridedShard`` cannot be averaged slice by slice.

    >>> placement_text("Shard(dim=1)")
    'Shard(1)'
    """
    kind = type(placement).__name__
    if kind == "Shard" and isinstance(getattr(placement, "dim", None), int):
        return f"Shard({placement.dim})"
    if kind == "Replicate":
        return REPLICATE
    if isinstance(placement, str):
        match = _SHARD.match(placement.strip())
        if match:
            return f"Shard({int(match.group(1))})"
        if placement.strip() in (REPLICATE, "Replicate"):
            return REPLICATE
    shown = placement if isinstance(placement, str) else repr(placement)
    raise TypeError(
        f"{name} has placement {shown[:80]}: only Shard(d) and Replicate() are supported "
        "(a Partial() tensor holds an unreduced sum and _StridedShard an interleaved slice); "
        "redistribute it to Shard or Replicate first, e.g. with DTensor.redistribute."
    )


def shard_dim(placement: str) -> int | None:
    """The tensor dim a ``"Shard(d)"`` splits, ``None`` for ``"Replicate()"``."""
    match = _SHARD.match(placement)
    return int(match.group(1)) if match else None


def check_placements(name: str, global_shape: Sequence[int], mesh: Mesh, placements: Sequence[Any]) -> tuple[str, ...]:
    """The placements as text, checked against the mesh and shape; ``TypeError`` naming ``name``."""
    texts = tuple(placement_text(p, name) for p in placements)
    if len(texts) != len(mesh.shape):
        raise TypeError(f"{name} has {len(texts)} placements {list(texts)} on {mesh.describe()}: one placement per mesh dim")
    for text in texts:
        dim = shard_dim(text)
        if dim is not None and dim >= len(global_shape):
            raise TypeError(f"{name} of shape {list(global_shape)} has placement {text}: it has no dim {dim}")
    return texts


def chunk(size: int, chunks: int, index: int) -> tuple[int, int]:
    """``(start, length)`` of chunk ``index`` of ``size`` items in ``chunks`` chunks, as ``torch.chunk`` splits.

    >>> [chunk(13, 2, i) for i in range(2)], [chunk(3, 4, i) for i in range(4)]
    ([(0, 7), (7, 6)], [(0, 1), (1, 1), (2, 1), (3, 0)])
    """
    full = -(-size // chunks)
    start = min(size, full * index)
    return start, max(0, min(size, start + full) - start)


def local_slice(global_shape: Sequence[int], mesh: Mesh, placements: Sequence[Any], rank: int) -> Slice:
    """The slice of a tensor of ``global_shape`` that ``rank`` holds (as torch's DTensor computes it).

    Mesh dims shard from left to right; two mesh dims sharding one tensor dim
    split it again. An empty shard's offset is the dim's size, as torch puts it.
    """
    texts = check_placements("tensor", global_shape, mesh, placements)
    coordinate = mesh.coordinate(rank)
    offset, size = [0] * len(global_shape), list(global_shape)
    for mesh_dim, text in enumerate(texts):
        dim = shard_dim(text)
        if dim is None:
            continue
        start, length = chunk(size[dim], mesh.shape[mesh_dim], coordinate[mesh_dim])
        offset[dim] = offset[dim] + start if length else global_shape[dim]
        size[dim] = length
    return Slice(tuple(offset), tuple(size))


def slice_replicas(global_shape: Sequence[int], mesh: Mesh, placements: Sequence[Any]) -> dict[Slice, tuple[int, ...]]:
    """Each distinct slice and the ranks (in mesh order) that hold it: the replicas of that slice."""
    out: dict[Slice, list[int]] = {}
    for rank in mesh.ranks:
        out.setdefault(local_slice(global_shape, mesh, placements, rank), []).append(rank)
    return {box: tuple(ranks) for box, ranks in out.items()}


def expand_to_root(sub: Mesh, placements: Sequence[Any], root: Mesh) -> tuple[str, ...]:
    """The placements on ``root`` of a tensor placed on ``sub``, a mesh sliced out of ``root`` by dim name.

    ``fully_shard(m, mesh=mesh["shard"])`` places each parameter on the 1-D
    ``shard`` mesh of its own replica; on the root mesh that is
    ``Replicate()`` on every other dim. ``TypeError`` if ``sub`` is not such a slice.

    >>> root = Mesh.from_ranks([[0, 1], [2, 3]], ("replicate", "shard"))
    >>> expand_to_root(Mesh.from_ranks([2, 3], ("shard",)), ["Shard(0)"], root)
    ('Replicate()', 'Shard(0)')
    """
    texts = [placement_text(p) for p in placements]
    if root.dims is None or sub.dims is None or not set(sub.dims) <= set(root.dims):
        raise TypeError(f"{sub.describe()} is not a slice of {root.describe()} by dim names")
    by_dim = dict(zip(sub.dims, texts))
    expanded = tuple(by_dim.get(name, REPLICATE) for name in root.dims)
    kept = [i for i, name in enumerate(root.dims) if name in by_dim]
    anchor = root.coordinate(sub.ranks[0])
    for rank in sub.ranks:
        coordinate = root.coordinate(rank)
        if any(coordinate[i] != anchor[i] for i in range(len(anchor)) if i not in kept):
            raise TypeError(f"{sub.describe()} is not a slice of {root.describe()}: its ranks span other dims")
    if [sub.shape[sub.dims.index(root.dims[i])] for i in kept] != [root.shape[i] for i in kept]:
        raise TypeError(f"{sub.describe()} does not match the sizes of {root.describe()}")
    return expanded


# -- validation against a hierarchy ------------------------------------------------


def mesh_replicas(mesh: Mesh, placements_of_params: Iterable[Sequence[Any]]) -> list[tuple[int, ...]]:
    """The whole replicas of a model on ``mesh``: the rank sets that together hold one full copy.

    A mesh dim is inside a replica when some parameter shards over it; a
    replica is the ranks that differ only along such dims.

    >>> mesh = Mesh.from_ranks([[0, 1], [2, 3]], ("replicate", "shard"))
    >>> mesh_replicas(mesh, [["Replicate()", "Shard(0)"], ["Replicate()", "Replicate()"]])
    [(0, 1), (2, 3)]
    """
    inner = {d for texts in placements_of_params for d, text in enumerate(placement_text(p) for p in texts) if shard_dim(text) is not None}
    outer_dims = [d for d in range(len(mesh.shape)) if d not in inner]
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in mesh.ranks:
        coordinate = mesh.coordinate(rank)
        groups.setdefault(tuple(coordinate[d] for d in outer_dims), []).append(rank)
    return [tuple(ranks) for _, ranks in sorted(groups.items())]


def check_levels(mesh: Mesh, placements_of_params: Iterable[Sequence[Any]], levels: Sequence[Level], world_size: int) -> list[Level]:
    """Check that every level's rank blocks are unions of whole replicas of ``mesh``.

    Returns the levels whose blocks each hold a single replica (nothing to
    average: the caller warns once and makes them no-ops). A misfit is a
    ``ValueError`` naming the level, the mesh and the fix.

    >>> mesh = Mesh.from_ranks([[0, 1], [2, 3]], ("replicate", "shard"))
    >>> check_levels(mesh, [["Replicate()", "Shard(0)"]], [Level(2, 2), Level(4, 4)], 4)
    [Level(period=2, group_size=2)]
    """
    replicas = mesh_replicas(mesh, placements_of_params)
    of_rank = {rank: replica for replica in replicas for rank in replica}
    size = len(replicas[0])
    single = []
    for index, level in enumerate(levels):
        what = f"level {index} (period {level.period}, group size {level.group_size})"
        counts = set()
        for block in contiguous_blocks(world_size, level.group_size):
            outside = [r for r in block if r not in of_rank]
            if outside:
                raise ValueError(
                    f"{what} groups ranks {block[:16]}, but ranks {outside[:8]} are not in {mesh.describe()}, "
                    "which holds the parameters: build the mesh over the whole world, "
                    f"e.g. init_device_mesh(device, ({world_size // size}, {size}), mesh_dim_names=('replicate', 'shard'))."
                )
            split = next((of_rank[r] for r in block if not set(of_rank[r]) <= set(block)), None)
            if split is not None:
                raise ValueError(
                    f"{what} groups ranks {block[:16]}, which splits the replica {list(split)[:16]} of {mesh.describe()}: "
                    f"every level must average whole replicas. Use group sizes that are multiples of the replica size "
                    f"{size} and a mesh whose replicas are contiguous ranks, e.g. "
                    f"init_device_mesh(device, ({world_size // size}, {size}), mesh_dim_names=('replicate', 'shard'))."
                )
            counts.add(len({of_rank[r] for r in block}))
        if counts == {1}:
            single.append(level)
    return single


def check_same_mesh(named: Iterable[tuple[str, Mesh, Sequence[Any]]]) -> Mesh:
    """The one mesh every named parameter is placed on; ``TypeError`` naming the first that differs."""
    first: tuple[str, Mesh] | None = None
    for name, mesh, placements in named:
        for p in placements:
            placement_text(p, name)
        if first is None:
            first = (name, mesh)
        elif mesh != first[1]:
            raise TypeError(
                f"parameter {name} (placements {[placement_text(p, name) for p in placements]}) is on {mesh.describe()}, "
                f"but {first[0]} is on {first[1].describe()}: every sharded parameter must be on the same mesh "
                "to be averaged slice by slice."
            )
    if first is None:
        raise TypeError("no sharded parameters were given")
    return first[1]
