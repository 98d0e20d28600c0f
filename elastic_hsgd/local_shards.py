"""Local shards of DTensor parameters (FSDP2, HSDP, tensor parallel): what they are, and their
storage as views of flat buffers.

A rank averages the **local shard** of each DTensor parameter (``p.to_local()``) with the ranks
that hold the same slice in the other replicas (:mod:`elastic_hsgd.sharding`,
:mod:`elastic_hsgd.shard_groups`). Averaging is elementwise, so the local shards go into one
flat buffer per (device, dtype), exactly as whole parameters do for a DDP model
(:class:`~elastic_hsgd.flat_params.FlatParameterBuffers`), and a sync is one in-place
all_reduce per buffer.

What FSDP2 does to that storage (measured with torch 2.13, gloo, 2 replicas x 2 shards, an
uneven 13-row weight): across forward, backward (with ``reshard_after_forward``) and optimizer
steps each sharded parameter stays the same ``DTensor`` object, its ``_local_tensor`` stays the
same tensor object and ``to_local().data_ptr()`` does not change. FSDP2 all-gathers from its own
``FSDPParam._sharded_param_data``, a 1-D view of the same storage padded to the largest shard
(7 rows on both ranks of a 7/6 split), and re-derives it only when the local tensor moves to
another storage (``reset_sharded_param`` at lazy init, after ``load_state_dict`` and
``module.to``). So one re-pointing is enough: :class:`ShardBuffers` gives each FSDP2 parameter
a padded segment of the flat buffer, points ``_sharded_param_data`` at the segment and the
local tensor at its unpadded front, and FSDP2 then reads and writes the flat buffer itself,
with no copy per call (training is bit-identical to an unflattened run). Other DTensors
(tensor parallel, ``distribute_tensor``) only have their local tensor re-pointed, at the
front of a segment padded to the parameter's largest slice likewise, so that every rank's
buffers (and anchors) have the same size. The padding is zeros on every rank and stays
zeros under averaging.

Example::

    >>> # xdoctest: +SKIP("needs a process group and an FSDP2 model")
    >>> buffers = ShardBuffers().buffers_for(list(model.parameters()))
    >>> buffers[0].data_ptr() == next(model.parameters()).to_local().data_ptr()
    True
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .sharding import Mesh, check_placements, expand_to_root, placement_text, slice_replicas

logger = logging.getLogger(__name__)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter of FSDP2, HSDP or tensor parallelism)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def _flattenable(tensor: torch.Tensor) -> bool:
    return tensor.layout == torch.strided and tensor.is_contiguous()


def describe_param(position: int, tensor: torch.Tensor) -> str:
    """``parameter 3 (DTensor, shape [13, 5], torch.float32)``, for messages."""
    return f"parameter {position} ({type(tensor).__name__}, shape {list(tensor.shape)}, {tensor.dtype})"


def local_of(param: Any) -> torch.Tensor:
    """The local shard of DTensor ``param``: the tensor this rank averages (no autograd wrapper)."""
    return param._local_tensor


@dataclass(frozen=True)
class Placed:
    """Where one DTensor parameter lives, as plain data: its root mesh and its placements on it."""

    name: str
    global_shape: tuple[int, ...]
    mesh: Mesh
    placements: tuple[str, ...]


def _plain_mesh(device_mesh: Any) -> Mesh:
    return Mesh.from_ranks(device_mesh.mesh.tolist(), device_mesh.mesh_dim_names)


def placed(position: int, param: Any) -> Placed:
    """``param``'s root mesh and placements on it; ``TypeError`` naming it for ``Partial`` and the like.

    ``fully_shard(m, mesh=mesh["shard"])`` places a parameter on the 1-D shard
    mesh of its replica; on the root mesh (the 2-D ``init_device_mesh``) that
    is ``Replicate()`` on the replicate dim, which is what tells replicas apart.
    """
    name = describe_param(position, param)
    for placement in param.placements:
        placement_text(placement, name)  # Partial, _StridedShard: TypeError naming the parameter
    sub = param.device_mesh
    root = sub._get_root_mesh() if hasattr(sub, "_get_root_mesh") else sub
    mesh = _plain_mesh(root)
    if root is sub:
        texts = check_placements(name, tuple(param.shape), mesh, param.placements)
    else:
        try:
            texts = expand_to_root(_plain_mesh(sub), param.placements, mesh)
        except TypeError as exc:
            raise TypeError(f"{name}: {exc}") from None
        texts = check_placements(name, tuple(param.shape), mesh, texts)
    return Placed(name, tuple(param.shape), mesh, texts)


def placed_all(indexed: Sequence[tuple[int, Any]]) -> tuple[Mesh, list[tuple[str, ...]]]:
    """The one root mesh of every DTensor parameter and each one's placements on it.

    ``TypeError`` naming the parameter and its placement for a ``Partial`` (or
    strided) placement, or for a parameter on another mesh.
    """
    described = [placed(position, p) for position, p in indexed]
    if not described:
        raise TypeError("no DTensor parameters were given")
    first = described[0]
    for d in described[1:]:
        if d.mesh != first.mesh:
            raise TypeError(
                f"cannot average {d.name} (placements {list(d.placements)} on {d.mesh.describe()}) with {first.name} "
                f"(on {first.mesh.describe()}): every DTensor parameter must live on the same device mesh (or on "
                "meshes sliced from the same one, as fully_shard(m, mesh=mesh['shard']) does) to be averaged slice by slice."
            )
    return first.mesh, [d.placements for d in described]


def _fsdp_params(params: Sequence[Any]) -> dict[int, Any]:
    """FSDP2's ``FSDPParam`` of each parameter that has one, by ``id`` of the parameter.

    FSDP2 keeps no public map from a parameter to its bookkeeping, so this is one
    pass over the garbage collector's objects, made only when flattening.
    """
    wanted = {id(p) for p in params}
    found = {}
    for obj in gc.get_objects():
        kind = type(obj)
        if kind.__name__ == "FSDPParam" and kind.__module__.startswith("torch.distributed.fsdp"):
            sharded = getattr(obj, "sharded_param", None)
            if id(sharded) in wanted and sharded is not None:
                found[id(sharded)] = obj
    return found


class ShardBuffers:
    """One contiguous buffer per (device, dtype) holding the local shards of DTensor parameters.

    The same contract as :class:`~elastic_hsgd.flat_params.FlatParameterBuffers`:
    :meth:`buffers_for` returns the buffers that *are* the shards' storage,
    re-flattening when the parameter set or a shard's storage changed (a
    ``load_state_dict(assign=True)``, ``module.to``).
    """

    def __init__(self) -> None:
        self._ids: tuple[int, ...] = ()
        self._pointers: tuple[int, ...] = ()
        self._buffers: list[torch.Tensor] = []

    def buffers_for(self, params: list[Any]) -> list[torch.Tensor]:
        """The flat buffers holding the local shards of ``params`` (DTensors), flattening if needed."""
        ids = tuple(id(p) for p in params)
        pointers = tuple(p._local_tensor.data_ptr() for p in params)
        if ids == self._ids and pointers == self._pointers and self._buffers:
            return self._buffers
        self._flatten(params)
        return self._buffers

    def _flatten(self, params: list[Any]) -> None:
        fsdp = _fsdp_params(params)
        locals_ = {id(p): local_of(p) for p in params}
        buffers = []
        with torch.no_grad():
            for (device, dtype), members in _by_kind(params).items():
                spans = [_span(p, fsdp.get(id(p))) for p in members]
                pinned = any(locals_[id(p)].is_pinned() for p in members) if device.type == "cpu" else False
                flat = torch.zeros(sum(spans), dtype=dtype, device=device, pin_memory=pinned)
                offset = 0
                for p, span in zip(members, spans):
                    _move_into(p, fsdp.get(id(p)), flat[offset : offset + span])
                    offset += span
                buffers.append(flat)
        self._buffers = buffers
        self._ids = tuple(id(p) for p in params)
        self._pointers = tuple(p._local_tensor.data_ptr() for p in params)
        logger.debug(
            "flattened the local shards of %d DTensor parameters (%d managed by FSDP2) into %d buffer(s) of %s elements",
            len(params), len(fsdp), len(buffers), [b.numel() for b in buffers],
        )


def _by_kind(params: list[Any]) -> dict[tuple[torch.device, torch.dtype], list[Any]]:
    """Parameters grouped by their local shards' (device, dtype), order kept: one buffer each."""
    groups: dict[tuple[torch.device, torch.dtype], list[Any]] = {}
    for p in params:
        local = local_of(p)
        groups.setdefault((local.device, local.dtype), []).append(p)
    return groups


def _span(param: Any, fsdp_param: Any) -> int:
    """Elements ``param`` takes in its buffer: FSDP2's padded shard, else its largest slice.

    Padded to the largest slice either way, so that every rank's buffers have
    the same size: a rank's saved anchors then have the shapes of every other
    rank's, as a checkpoint's mean of replicas at another world size requires.
    """
    if fsdp_param is not None:
        return int(torch.Size(fsdp_param.padded_sharded_param_size).numel())
    where = placed(0, param)
    return max(box.numel for box in slice_replicas(where.global_shape, where.mesh, where.placements))


def _move_into(param: Any, fsdp_param: Any, segment: torch.Tensor) -> None:
    """Copy ``param``'s local shard into ``segment`` and make the segment its storage."""
    local = local_of(param)
    if fsdp_param is None:
        view = segment[: local.numel()].view(local.shape)
        view.copy_(local)
        param._local_tensor = view
        return
    # FSDP2 all-gathers from _sharded_param_data (padded to the largest shard) and keeps the
    # local tensor as the unpadded front of it; both must be views of the segment.
    padded = segment.view(fsdp_param.padded_sharded_param_size)
    dim = fsdp_param.fsdp_placement.dim
    length = local.size(dim) if local.numel() > 0 else 0
    view = padded.narrow(dim, 0, length)
    view.copy_(local)
    fsdp_param._sharded_param_data = segment
    param._local_tensor = view


def check_local_shards(indexed: Sequence[tuple[int, Any]]) -> None:
    """``TypeError`` naming the first DTensor parameter whose local shard cannot live in a flat buffer."""
    for position, p in indexed:
        if not _flattenable(local_of(p)):
            raise TypeError(
                f"cannot average {describe_param(position, p)}: its local shard is sparse or non-contiguous "
                f"(strides {list(local_of(p).stride())}), so it cannot be a view of a flat buffer; make the "
                "parameter contiguous before sharding it."
            )
