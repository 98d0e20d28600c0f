"""One consolidated model file from a checkpoint, read one tensor at a time.

``python -m elastic_hsgd export URL [--step N] [--rank R] OUT.safetensors`` writes
the model of a committed step as a plain safetensors file: the mean of the
saved replicas (or one saved rank's replica), under the names an unwrapped
model uses, so that::

    >>> # xdoctest: +SKIP("needs a checkpoint")
    >>> from safetensors.torch import load_file
    >>> model.load_state_dict(load_file("model.safetensors"), strict=True)

**Bounded reads.** Export reads the rank files' headers (:mod:`.rank_index`),
then each tensor of the model by a ranged read from each replica's file, adds
it into one float64 accumulator and writes the mean before reading the next
tensor: memory is one tensor and its accumulator, whatever the model or world
size.

**The model entry** is the state entry that holds a module's state dict (a
flat dict of tensors under string keys): ``entry=`` when given, else the
entry named ``"model"`` if it is one, else the only such entry. Otherwise the
error lists the candidates.

**Values.** Floating-point tensors are averaged in float64 and cast back, the
same rule as a resume at another world size (:mod:`.replicas`). Integer and
bool tensors (e.g. BatchNorm's ``num_batches_tracked``) are not averaged: they
must be equal in every replica, else export fails naming the tensor (export
one replica with ``rank=`` instead).

**Names.** :func:`~.names.plain_names`: ``_orig_mod.`` (``torch.compile``) is
removed wherever it occurs, and ``module.`` (DDP) when every key starts with it.
(The manager saves module state under these names already; older checkpoints may not.)

**Layouts.** A :class:`ReplicaReader` gives the full tensor of one replica;
:func:`export_model` only asks readers. Each saved rank holds a whole replica
(:class:`UnshardedReader`), or, for DTensor state, a replica's tensor is
assembled from its ranks' boxes (:class:`~.sharded_export.ShardedReader`),
chosen in :func:`open_reader`.

Export checks file sizes against the commit record but reads only byte
ranges, so it cannot check whole-file checksums: run ``verify`` for that.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

import torch

from . import format as fileformat
from .layout import CommitRecord
from .names import plain_names as plain_names  # defined in .names; still importable from here
from .rank_index import RankIndex, TensorSpec, rank_file, read_index, read_tensor
from .sharded_export import ShardedReader
from .storage import CheckpointError, Storage


# -- choosing the model and its names --------------------------------------------


def choose_model_entry(index: RankIndex, entry: str | None = None) -> str:
    """The state entry that holds the model (see the module docstring); ``CheckpointError`` lists the choices."""
    entries = index.entries()
    modules = [name for name, node in entries.items() if index.module_state(node) is not None]
    described = ", ".join(f"{n} ({'module state, ' if n in modules else ''}{len(index.refs(entries[n]))} tensors)" for n in entries)
    if entry is not None:
        if entry in modules:
            return entry
        why = "is not a module state dict (a flat dict of tensors)" if entry in entries else "does not exist"
        raise CheckpointError(f"entry {entry!r} {why}; the checkpoint holds: {described}")
    if "model" in modules:
        return "model"
    if len(modules) == 1:
        return modules[0]
    why = "no entry is a module state dict" if not modules else f"several entries are module state dicts ({', '.join(modules)})"
    raise CheckpointError(f"{why}; the checkpoint holds: {described}. Choose one with --entry NAME.")


# -- layouts ----------------------------------------------------------------------


class ReplicaReader(Protocol):
    """The model's tensors in one layout of checkpoint: each replica's full tensor, one at a time.

    A replica is named by a saved rank that belongs to it.
    """

    entry: str  # the state entry holding the model
    keys: list[str]  # its keys, as saved
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    replicas: list[int]  # the replicas to average (one: export that replica)

    def read(self, key: str, replica: int) -> torch.Tensor:
        """The full tensor ``key`` of ``replica``."""
        ...


class UnshardedReader:
    """Every saved rank holds a whole replica: its tensor is one ranged read of its own file."""

    def __init__(self, storage: Storage, record: CommitRecord, replicas: list[int], entry: str | None) -> None:
        self.storage = storage
        self.replicas = replicas
        self.files: dict[int, tuple[str, dict[str, TensorSpec]]] = {}
        for rank in replicas:
            path, size = rank_file(storage, record, rank)
            index = read_index(storage, path, size, record.format)
            if not self.files:
                self.entry = choose_model_entry(index, entry)
            state = index.module_state(index.entries().get(self.entry))
            if state is None:
                raise CheckpointError(f"saved rank {rank} of step {record.step} has no module state entry {self.entry!r}")
            if self.files:
                _check_same(self.files[replicas[0]][1], state, replicas[0], rank)
            self.files[rank] = (path, state)
        first = self.files[replicas[0]][1]
        self.keys = list(first)
        self.specs = {key: (spec.dtype, spec.shape) for key, spec in first.items()}

    def read(self, key: str, replica: int) -> torch.Tensor:
        path, state = self.files[replica]
        return read_tensor(self.storage, path, state[key])


def _check_same(a: dict[str, TensorSpec], b: dict[str, TensorSpec], rank_a: int, rank_b: int) -> None:
    for key in dict.fromkeys([*a, *b]):
        got = [(s.dtype, list(s.shape)) if s else "missing" for s in (a.get(key), b.get(key))]
        if got[0] != got[1]:
            raise CheckpointError(f"model tensor {key!r} differs between saved ranks {rank_a} and {rank_b}: {got[0]} vs {got[1]}")


def open_reader(storage: Storage, record: CommitRecord, *, rank: int | None = None, entry: str | None = None) -> ReplicaReader:
    """The reader for this checkpoint's layout: every replica, or only the one ``rank`` saved.

    A checkpoint of DTensor state (recognised from saved rank 0's layout
    records) gets :class:`~.sharded_export.ShardedReader`; nothing else changes.
    """
    if rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool) and 0 <= rank < record.world_size):
        raise CheckpointError(f"rank {rank!r} is not a saved rank of step {record.step}: its ranks are 0..{record.world_size - 1}")
    sharded = ShardedReader.open(storage, record, rank=rank, entry=entry)
    if sharded is not None:
        return sharded
    return UnshardedReader(storage, record, [rank] if rank is not None else list(range(record.world_size)), entry)


# -- export -----------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    path: str
    step: int
    entry: str
    replicas: tuple[int, ...]  # the replicas averaged, each named by a saved rank (one: that replica)
    tensors: int
    bytes: int


def committed_record(storage: Storage, step: int | None = None) -> CommitRecord:
    """The commit record of ``step`` (default: the newest committed step)."""
    steps = storage.committed_steps()
    if not steps:
        raise CheckpointError(f"no committed checkpoints at {storage.url}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"step {step} is not committed at {storage.url}; committed: {steps}")
    path = storage.commit_path(step)
    try:
        return CommitRecord.from_json(json.loads(storage.read_file(path)))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"commit record {storage.fs.unstrip_protocol(path)} is unreadable: {exc}") from exc


def export_model(
    storage: Storage, out: str, *, step: int | None = None, rank: int | None = None, entry: str | None = None
) -> ExportSummary:
    """Write the model of ``step`` to the local file ``out`` (see the module docstring).

    ``rank``: export the replica that saved rank holds, instead of the mean.
    The file appears whole or not at all.
    """
    record = committed_record(storage, step)
    reader = open_reader(storage, record, rank=rank, entry=entry)
    replicas = reader.replicas
    names = plain_names(reader.keys)
    order = sorted(reader.keys, key=lambda k: (-reader.specs[k][0].itemsize, names[k]))
    layout = [(names[k], *reader.specs[k]) for k in order]
    source = f"saved rank {rank}" if rank is not None else f"mean of {len(replicas)} saved replicas"
    metadata = {"format": "pt", "source": storage.url, "step": str(record.step), "entry": reader.entry, "replicas": source}
    written = write_safetensors(out, layout, (_consolidated(reader, key, replicas) for key in order), metadata)
    return ExportSummary(out, record.step, reader.entry, tuple(replicas), len(order), written)


def _consolidated(reader: ReplicaReader, key: str, replicas: list[int]) -> torch.Tensor:
    """The mean of ``key`` over ``replicas``; integer and bool tensors must agree instead."""
    first = reader.read(key, replicas[0])
    if len(replicas) == 1:
        return first
    dtype = first.dtype
    if dtype.is_floating_point or dtype.is_complex:
        total = first.to(torch.complex128 if dtype.is_complex else torch.float64)
        for replica in replicas[1:]:
            total += reader.read(key, replica)
        return (total / len(replicas)).to(dtype)
    for replica in replicas[1:]:
        if not torch.equal(reader.read(key, replica), first):
            raise CheckpointError(
                f"model tensor {key!r} ({str(dtype).removeprefix('torch.')}) differs between saved ranks {replicas[0]} and {replica}: "
                "integer and bool tensors are not averaged, so every replica must hold the same; "
                "export one replica with --rank R."
            )
    return first


def write_safetensors(
    out: str, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterable[torch.Tensor], metadata: dict[str, str]
) -> int:
    """Stream a safetensors file: the header from ``layout``, then each tensor of ``tensors`` as it comes.

    Written to a temporary name beside ``out`` and renamed, so a failed export
    leaves no partial file. Returns the file's size.
    """
    if "://" in out:
        raise CheckpointError(f"output {out!r} must be a local path")
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": fileformat.DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for (name, dtype, shape), tensor in zip(layout, tensors, strict=True):
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise CheckpointError(f"tensor {name!r} came out as {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}")
                if tensor.numel():
                    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return 8 + len(raw) + offset
