"""Loading a checkpoint into sharded (DTensor) state: an exact resume, or every new shard resharded.

:func:`load_sharded` is collective. It first asks whether every rank's live
boxes are the ones it saved (same world, same shard layout). If so, each rank
loads its own verified file: a bit-identical resume, RNG included.

Otherwise every new rank gets the **mean of the saved replicas of its slice**:

- the saved files' headers are read (each rank its share of the saved ranks,
  which it also verifies by checksum) and their layouts gathered, so every
  rank knows which saved ranks hold which box of each sharded tensor;
- the unsharded state is today's mean of replicas (:mod:`.replicas`):
  floating tensors averaged in float64, integer tensors, 0-d tensors (AdamW's
  ``step``) and plain values equal in every saved replica or a
  :class:`~.storage.CheckpointError`;
- each sharded tensor's new box is planned from the saved boxes
  (:func:`~.sharded.plan_slice`) and read by byte range, only the parts that
  overlap it, from every saved replica; the replicas are summed in float64 and
  the mean written into the live DTensor's local tensor. Nothing gathers a
  full tensor;
- a sharded averager's anchors and outer-optimizer state (flat buffers of
  each rank's shards) at the same shard layout: the mean of the saved
  replicas of this rank's slices (:mod:`.sharded_outer`); at another layout
  the averager drops them with a WARNING.

A layout that does not hold together (overlapping or missing boxes, a shape
other than its record's, a box its own mesh does not give) is
:class:`~.commit.Unusable`, a :class:`~.storage.CheckpointError` a reader
falls back past.

Example::

    >>> # xdoctest: +SKIP("needs a process group, an FSDP2 model and a checkpoint")
    >>> fully_shard(model, mesh=init_device_mesh("cpu", (1, 4), mesh_dim_names=("replicate", "shard"))["shard"])
    >>> state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
    >>> load_sharded_step(state, tier.reader(step), peers, storage=tier.storage)
    ShardedLoad(exact=False, bytes_read=1600, shard_bytes_read=912)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from ..collectives import Peers
from ..sharding import Slice
from . import format as fileformat
from .commit import Unusable
from .layout import files_to_read
from .dtensor_state import Path, Target, live_boxes, records_in
from .rank_index import RankIndex, TensorSpec
from .replicas import mean_of_replicas
from .sharded import coalesce, is_record, parse_record, plan_slice
from .sharded_files import FetchedFiles, RangedFiles, SavedFiles
from .sharded_outer import reslice_outer
from .state import RNG_KEY, restore
from .storage import CheckpointError, Storage

logger = logging.getLogger(__name__)

#: Per saved rank, per ``(entry, *path)``: global shape, offset, size, dtype code, byte start, byte count.
LayoutTable = dict[int, dict[Path, tuple]]


@dataclass(frozen=True)
class ShardedLoad:
    """How a sharded load went: ``exact`` (own files, RNG restored) or resharded; the bytes this rank read
    by range, in all and for the sharded tensors' boxes."""

    exact: bool
    bytes_read: int
    shard_bytes_read: int = 0


def load_sharded_step(
    state: MutableMapping[str, Any],
    reader: Any,
    peers: Peers,
    *,
    storage: Storage | None = None,
    strict: bool = True,
    policies: Mapping[str, Any] | None = None,
) -> ShardedLoad:
    """Load the step ``reader`` (a tier's :class:`~.tiers.StepReader`) offers into sharded ``state``. Collective.

    Reads by byte range when ``storage`` is where the reader's files are, else
    through ``reader.fetch``. ``policies``: the unsharded entries' merge
    policies (:mod:`.merge`), as for any resume at another world size.
    """
    files: SavedFiles = RangedFiles(storage, reader) if storage is not None and storage.url == reader.url else FetchedFiles(reader)
    what = f"loading checkpoint step {reader.record.step} from {reader.url}"
    return load_sharded(state, files, peers, what=what, strict=strict, policies=policies)


def load_sharded(
    state: MutableMapping[str, Any], files: SavedFiles, peers: Peers, *, what: str, strict: bool = True, policies: Mapping[str, Any] | None = None
) -> ShardedLoad:
    """Load ``files`` into ``state``, exactly or resharded (see the module docstring). Collective."""
    if _exact_everywhere(state, files, peers, what):
        payload, error = None, None
        try:
            payload = files.fetch(peers.rank)
        except Exception as exc:  # noqa: BLE001 - agreed below
            error = exc
        peers.agree(error, what, soft=Unusable)
        _restore_agreed(state, payload, peers, what, restore_rng=True, strict=strict, fill=None)
        return ShardedLoad(True, files.bytes_read)  # the whole own file, through fetch
    layouts: LayoutTable = {}
    plain, error = {}, None
    try:  # the saved ranks mean_of_replicas asks for, read (and verified) first: their layouts are checked before the mean
        for saved_rank in files_to_read(peers.rank, peers.world_size, files.record.world_size):
            plain[saved_rank] = _plain_payload(files, saved_rank, layouts, what)
    except Exception as exc:  # noqa: BLE001 - agreed below
        error = exc
    peers.agree(error, what, soft=Unusable)
    table: LayoutTable = {}
    for part in peers.gather(layouts):
        table.update(part)
    check_layouts(table, files.record.world_size, what)  # the same table on every rank: all raise alike
    merged = _with_records(mean_of_replicas(files.record, what, plain.pop, peers, policies))
    reslice_outer(state, merged, files, table, peers, what)  # a sharded averager's outer state: slice by slice
    fill, before = Resharder(files, table, what).fill, files.bytes_read
    _restore_agreed(state, merged, peers, what, restore_rng=False, strict=strict, views=False, fill=fill)
    return ShardedLoad(False, files.bytes_read, files.bytes_read - before)


def check_layouts(table: LayoutTable, saved_world_size: int, what: str) -> None:
    """Every saved rank holds every sharded tensor, and each tensor's saved boxes tile it; else :class:`~.commit.Unusable`.

    >>> check_layouts({0: {("m", "w"): ((4,), (0,), (2,), "F32", 0, 8)}, 1: {("m", "w"): ((4,), (2,), (2,), "F32", 0, 8)}}, 2, "load")
    """
    paths = sorted({path for layouts in table.values() for path in layouts}, key=str)
    for path in paths:
        shown = "/".join(map(str, path))
        lacking = [rank for rank in range(saved_world_size) if path not in table.get(rank, {})]
        if lacking:
            raise Unusable(f"{what}: saved ranks {lacking[:8]} lack the sharded tensor {shown}: a part of it is missing from their rank files")
        entries = {rank: table[rank][path] for rank in range(saved_world_size)}
        shapes = {e[0] for e in entries.values()}
        if len(shapes) != 1 or len({e[3] for e in entries.values()}) != 1:
            raise Unusable(f"{what}: {shown}: the saved ranks disagree on its global shape or dtype ({sorted(map(list, shapes))})")
        (shape,) = shapes
        try:  # the whole tensor from the saved boxes: overlapping or missing parts are refused
            plan_slice(Slice((0,) * len(shape), shape), {r: Slice(e[1], e[2]) for r, e in entries.items()}, shape, 1, f"{what}: {shown}", ranges=False)
        except CheckpointError as exc:
            raise Unusable(str(exc)) from None


def _restore_agreed(state: MutableMapping[str, Any], payload: Any, peers: Peers, what: str, **options: Any) -> None:
    """:func:`~.state.restore`, its failure raised on every rank (it runs no collective)."""
    error = None
    try:
        restore(state, payload, **options)
    except KeyError:
        raise  # entries missing from the checkpoint: the same on every rank
    except Exception as exc:  # noqa: BLE001 - agreed below
        error = exc
    peers.agree(error, what, soft=Unusable)


def saved_tree(index: RankIndex) -> Any:
    """A rank file's tree as Python values, each tensor a :class:`~.rank_index.TensorSpec`."""
    try:
        return fileformat._decode(index.tree, index.tensors)
    except fileformat.FormatError as exc:
        raise Unusable(f"malformed tree: {exc}") from None


def _exact_everywhere(state: MutableMapping[str, Any], files: SavedFiles, peers: Peers, what: str) -> bool:
    """Collective: whether every rank saved exactly the boxes it now holds (same world, same layout)."""
    mine, error = False, None
    try:
        if files.record.world_size == peers.world_size:
            saved = saved_tree(files.index(peers.rank))
            mine = isinstance(saved, dict)
            for name, obj in state.items():
                if mine and name in saved:
                    mine = _same_boxes(obj, saved[name], name, peers.rank, what)
    except Exception as exc:  # noqa: BLE001 - agreed below
        error = exc
    peers.agree(error, what, soft=Unusable)
    return all(peers.gather(mine))


def _same_boxes(obj: Any, saved: Any, name: str, rank: int, what: str) -> bool:
    boxes = live_boxes(obj, saved, name, what)  # a CheckpointError if the live state is not sharded there
    for path, record in records_in(saved):
        spec = record.get("local")
        try:
            layout = parse_record(record, spec.shape if isinstance(spec, TensorSpec) else (), rank, f"{what}: {name}/{'/'.join(map(str, path))}")
        except CheckpointError as exc:
            raise Unusable(str(exc)) from None
        if boxes[(name, *path)] != layout.box:
            return False
    return True


# -- the unsharded part: today's mean of replicas, sharded tensors held out -------------------


@dataclass(frozen=True)
class _Sharded:
    """A record held out of the mean; its text is what must agree between saved replicas."""

    record: dict
    text: str

    def __repr__(self) -> str:
        return self.text


@dataclass(frozen=True)
class _ZeroDim:
    """A 0-d floating tensor (AdamW's ``step``): not averaged, it must agree between saved replicas."""

    value: float
    dtype: torch.dtype

    def __repr__(self) -> str:
        return f"{self.dtype} {self.value!r}"


def _plain_payload(files: SavedFiles, saved_rank: int, layouts: LayoutTable, what: str) -> dict[str, Any]:
    """A saved rank's unsharded state, read by range (all its tensors in one batch of coalesced spans);
    its records' layouts go to ``layouts``."""
    files.verify(saved_rank)
    tree = saved_tree(files.index(saved_rank))
    if not isinstance(tree, dict):
        raise Unusable(f"saved rank {saved_rank}: the tree is a {type(tree).__name__}, not a dict of entries")
    tree.pop(RNG_KEY, None)
    table: dict[Path, tuple] = {}
    wanted: list[TensorSpec] = []

    def hold_out(node: Any, path: Path) -> Any:
        if is_record(node):
            spec = node.get("local")
            where = f"{what}: saved rank {saved_rank}, {'/'.join(map(str, path))}"
            if not isinstance(spec, TensorSpec):
                raise Unusable(f"{where}: a sharded tensor's record holds no tensor")
            try:
                layout = parse_record(node, spec.shape, saved_rank, where)
            except CheckpointError as exc:
                raise Unusable(str(exc)) from None
            dtype = fileformat.DTYPES[spec.dtype]
            table[path] = (layout.global_shape, layout.box.offset, layout.box.size, dtype, spec.start, spec.nbytes)
            return _Sharded(dict(node), f"sharded {dtype} {list(layout.global_shape)}")
        if isinstance(node, TensorSpec):
            wanted.append(node)
        return _map(node, path, hold_out)

    tree = hold_out(tree, ())
    values = _read_specs(files, saved_rank, wanted)

    def fill(node: Any, path: Path) -> Any:
        if isinstance(node, TensorSpec):
            tensor = values[(node.start, node.nbytes)]
            return _ZeroDim(float(tensor), tensor.dtype) if tensor.ndim == 0 and tensor.is_floating_point() else tensor
        return _map(node, path, fill)

    layouts[saved_rank] = table
    return fill(tree, ())


def _map(node: Any, path: Path, fn: Any) -> Any:
    """``node`` with ``fn(child, child_path)`` applied to each child of a dict, list or tuple; other nodes as they are."""
    if isinstance(node, dict):
        return {k: fn(v, (*path, k)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        items = [fn(v, (*path, i)) for i, v in enumerate(node)]
        return items if isinstance(node, list) else tuple(items)
    return node


def _read_specs(files: SavedFiles, saved_rank: int, specs: list[TensorSpec]) -> dict[tuple[int, int], torch.Tensor]:
    """The tensors of ``specs`` by ``(start, nbytes)``, read as coalesced spans in one batch."""
    ordered = sorted((s for s in specs if s.nbytes), key=lambda s: s.start)
    spans = coalesce([(s.start, s.nbytes) for s in ordered])
    values = {(s.start, 0): torch.empty(s.shape, dtype=s.dtype) for s in specs if not s.nbytes}
    it = iter(ordered)
    for (_, _, parts), data in zip(spans, files.read_many(saved_rank, [(start, n) for start, n, _ in spans])):
        view = memoryview(data)
        for offset, nbytes in parts:
            spec = next(it)
            values[(spec.start, spec.nbytes)] = _tensor(view[offset : offset + nbytes], spec.dtype, spec.shape)
    return values


def _with_records(node: Any, path: Path = ()) -> Any:
    """The mean's tree with the held-out records and 0-d tensors put back."""
    if isinstance(node, _Sharded):
        return node.record
    if isinstance(node, _ZeroDim):
        return torch.tensor(node.value, dtype=node.dtype)
    return _map(node, path, _with_records)


def _tensor(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not memoryview(data).nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


# -- the sharded part: each new box from the overlapping saved boxes ----------------------


class Resharder:
    """Fills a live DTensor's box with the mean of the saved replicas, reading only overlapping bytes."""

    def __init__(self, files: SavedFiles, table: LayoutTable, what: str) -> None:
        self.files, self.table, self.what = files, table, what

    def fill(self, path: Path, record: dict, target: Target) -> None:
        where = f"{self.what}: {'/'.join(map(str, path))}"
        held = {rank: layouts[path] for rank, layouts in self.table.items() if path in layouts}
        if not held:
            raise Unusable(f"{where}: no saved rank holds this sharded tensor")
        global_shape, code = next(iter(held.values()))[0], next(iter(held.values()))[3]  # agreed: check_layouts
        dtype = fileformat.TORCH_DTYPES[code]
        saved = {rank: Slice(h[1], h[2]) for rank, h in held.items()}
        try:
            pieces = plan_slice(target.box, saved, global_shape, dtype.itemsize, where)
        except CheckpointError as exc:
            raise Unusable(str(exc)) from None
        for piece in pieces:
            index = tuple(slice(b - t, b - t + n) for b, t, n in zip(piece.box.offset, target.box.offset, piece.box.size))
            values = [self._box(read.saved_rank, held[read.saved_rank][4], read.ranges, dtype, piece.box.size) for read in piece.reads]
            if dtype.is_floating_point or dtype.is_complex:
                total = values[0].to(torch.complex128 if dtype.is_complex else torch.float64)
                for value in values[1:]:
                    total += value
                target.local[index].copy_(total / len(values))
                continue
            for read, value in zip(piece.reads[1:], values[1:]):
                if not torch.equal(value, values[0]):
                    raise CheckpointError(
                        f"{where} ({code}) differs between saved ranks {piece.reads[0].saved_rank} and {read.saved_rank}: "
                        "integer and bool tensors are not averaged, so every saved replica must hold the same"
                    )
            target.local[index].copy_(values[0])

    def _box(self, saved_rank: int, start: int, ranges: tuple[tuple[int, int], ...], dtype: torch.dtype, size: tuple[int, ...]) -> torch.Tensor:
        """The box's values from one saved shard: its byte ranges, read as coalesced spans."""
        spans = coalesce(ranges)
        data = bytearray()
        for (_, _, parts), span in zip(spans, self.files.read_many(saved_rank, [(start + s, n) for s, n, _ in spans])):
            view = memoryview(span)
            for offset, nbytes in parts:
                data += view[offset : offset + nbytes]
        return _tensor(data, dtype, size)
