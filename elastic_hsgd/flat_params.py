"""Parameters kept as views into persistent flat buffers, so averaging is one
in-place all_reduce per (device, dtype) with no per-call copy.

torch's ``average_parameters`` concatenates every parameter into a new buffer
on every call and re-points ``p.data`` at it; on fast links that copy is the
whole cost. Here the flattening happens once: afterwards the buffer *is* the
parameters' storage, and a cheap pointer check notices when something (``.to``,
``load_state_dict`` that reassigns, a different parameter set) broke that.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from .local_shards import ShardBuffers, check_local_shards, is_dtensor

logger = logging.getLogger(__name__)

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def params_to_average(params: Iterable[Any], *, with_grad_only: bool = False) -> list[torch.Tensor]:
    """Parameters that require a gradient (or have one), from ``model.parameters()``
    or ``optimizer.param_groups``, each once (tied parameters are averaged once).

    Selected by ``requires_grad``, not by ``.grad is not None``: a loop that
    calls ``optimizer.zero_grad(set_to_none=True)`` right after ``step()`` has
    no gradients left when it averages, and the set must not depend on that.
    Averaging a parameter that got no gradient is harmless (its replicas are
    equal). ``with_grad_only=True`` takes only those that have a gradient
    (torch's averager's rule).

    Example::

        >>> import torch
        >>> used, frozen = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2), requires_grad=False)
        >>> [p is used for p in params_to_average([used, frozen, used])]
        [True]
    """
    return [p for _, p in _indexed_params_to_average(params, with_grad_only=with_grad_only)]


def _indexed_params_to_average(params: Iterable[Any], *, with_grad_only: bool = False) -> list[tuple[int, torch.Tensor]]:
    selected: list[tuple[int, torch.Tensor]] = []
    seen: set[int] = set()
    position = 0

    def take(tensor: Any) -> None:
        nonlocal position
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"cannot average {type(tensor).__name__!r}: pass model.parameters() or "
                "optimizer.param_groups."
            )
        wanted = tensor.grad is not None if with_grad_only else tensor.requires_grad or tensor.grad is not None
        if wanted and id(tensor) not in seen:
            seen.add(id(tensor))
            selected.append((position, tensor))
        position += 1

    for item in params:
        if isinstance(item, dict):
            for tensor in item["params"]:
                take(tensor)
        else:
            take(item)
    return selected


#: Averaged in float32 and rounded once: summing world-size terms in 16 bits
#: loses what torch's averager (which concatenates mixed dtypes in float32) keeps.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _describe(position: int, tensor: torch.Tensor) -> str:
    return f"parameter {position} ({type(tensor).__name__}, shape {list(tensor.shape)}, {tensor.dtype})"


class AveragingInputs:
    """What one averager is given, checked once and split by how to average it.

    - DTensor parameters (FSDP2, HSDP, tensor parallel) go to ``flat``: their
      local shards live in flat buffers (:mod:`elastic_hsgd.local_shards`);
      all of the parameters must be DTensors then. Other tensor subclasses
      (FSDP1's FlatParameter, wrappers) are refused: an all_reduce of their
      data is not the average of the model.
    - Sparse or non-contiguous (e.g. channels_last) parameters cannot be views
      of a flat buffer; they alone go through the copy path (warned once), the
      rest stay on the flat path.
    - float16/bfloat16 parameters keep their own flat buffer, averaged in
      float32 and rounded once (:func:`elastic_hsgd.levels.plain.mean_in_place`).
    - Parameters are selected by ``requires_grad`` (:func:`params_to_average`); an
      iterable with tensors none of which requires a gradient (``model.buffers()``) warns once.
    """

    def __init__(self) -> None:
        self._warned_no_grad = False
        self._warned_odd: set[int] = set()

    def split(
        self, params: Iterable[Any], *, with_grad_only: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(flat, by_copy)``: parameters for flat buffers, and those averaged by copying.

        ``with_grad_only`` as in :func:`params_to_average`.
        """
        given = list(params)
        selected = _indexed_params_to_average(given, with_grad_only=with_grad_only)
        subclassed = [(i, t) for i, t in selected if type(t) not in _PLAIN]
        if subclassed:
            return _sharded_inputs(selected, subclassed), []
        if given and not selected and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                f"average_parameters got {_count(given)} tensors but none has a gradient or requires one, so "
                "nothing is averaged: pass model.parameters() or optimizer.param_groups (not model.buffers() "
                "or frozen parameters).",
                stacklevel=3,
            )
        flat, by_copy, odd = [], [], []
        for position, tensor in selected:
            if not flattenable(tensor):
                by_copy.append(tensor)
                odd.append((position, tensor))
            else:
                flat.append(tensor)
        fresh = [(i, t) for i, t in odd if id(t) not in self._warned_odd]
        if fresh:
            self._warned_odd.update(id(t) for _, t in fresh)
            warnings.warn(
                f"{len(fresh)} parameter(s) cannot live in a flat buffer and are averaged by copying on every "
                f"averaging step: {', '.join(_describe(i, t) + (' sparse' if t.layout != torch.strided else ' non-contiguous') for i, t in fresh[:4])}. "
                "The other parameters stay on the copy-free path.",
                stacklevel=3,
            )
        return flat, by_copy


def _sharded_inputs(selected: list[tuple[int, torch.Tensor]], subclassed: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
    """DTensor parameters (every one of them), whose local shards go into flat buffers; ``TypeError`` otherwise."""
    for position, tensor in subclassed:
        if not is_dtensor(tensor):
            raise TypeError(
                f"cannot average {_describe(position, tensor)}: HierarchicalModelAverager averages plain-tensor "
                "parameters (a DistributedDataParallel model's) or DTensor parameters (FSDP2, HSDP, tensor "
                "parallelism), and another tensor subclass (FSDP1's FlatParameter, a wrapper) holds data whose "
                "all_reduce is not the model's average. Use DistributedDataParallel or fully_shard instead, or "
                "pass only plain-tensor parameters."
            )
    if len(subclassed) != len(selected):
        dtensor = subclassed[0]
        plain = next((i, t) for i, t in selected if not is_dtensor(t))
        raise TypeError(
            f"cannot average {_describe(*dtensor)} together with plain-tensor {_describe(*plain)}: either every "
            "averaged parameter is a DTensor (fully_shard the whole model, or distribute_tensor the rest with "
            "Replicate()) or none is (the parameters of a DistributedDataParallel model)."
        )
    check_local_shards(selected)
    return [t for _, t in selected]


def _count(given: list[Any]) -> int:
    return sum(len(item["params"]) if isinstance(item, dict) else 1 for item in given)


def _by_kind(params: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """Parameters grouped by (device, dtype), order kept: one buffer or reduction each."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return groups


def flattenable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can be a view of a flat buffer: dense (strided) and contiguous."""
    return tensor.layout == torch.strided and tensor.is_contiguous()


class FlatParameterBuffers:
    """One contiguous buffer per (device, dtype) backing a fixed list of parameters."""

    def __init__(self) -> None:
        self._ids: tuple[int, ...] = ()
        self._pointers: tuple[int, ...] = ()
        self._buffers: list[torch.Tensor] = []
        self._shards: ShardBuffers | None = None

    def buffers_for(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The flat buffers holding exactly ``params``, re-flattening if needed.

        Returns ``None`` when the parameters cannot live in a flat buffer
        (sparse or non-contiguous); the caller then averages by copying.
        DTensor parameters (all of them, as :class:`AveragingInputs` hands
        them over): the buffers of their local shards (:class:`~elastic_hsgd.local_shards.ShardBuffers`).
        """
        if params and type(params[0]) not in _PLAIN:
            if self._shards is None:
                self._shards = ShardBuffers()
            return self._shards.buffers_for(params)
        ids = tuple(id(p) for p in params)
        pointers = tuple(p.data_ptr() for p in params)
        if ids == self._ids and pointers == self._pointers and self._buffers:
            return self._buffers
        if not all(flattenable(p) for p in params):
            return None
        self._flatten(params)
        return self._buffers

    def _flatten(self, params: list[torch.Tensor]) -> None:
        buffers = []
        with torch.no_grad():
            for (device, dtype), members in _by_kind(params).items():
                flat = torch.empty(sum(p.numel() for p in members), dtype=dtype, device=device)
                offset = 0
                for p in members:
                    view = flat[offset : offset + p.numel()].view_as(p)
                    view.copy_(p.data)
                    p.data = view
                    offset += p.numel()
                buffers.append(flat)
        self._buffers = buffers
        self._ids = tuple(id(p) for p in params)
        self._pointers = tuple(p.data_ptr() for p in params)
        logger.debug(
            "flattened %d parameters into %d buffer(s) of %s elements",
            len(params),
            len(buffers),
            [b.numel() for b in buffers],
        )


def pack_by_kind(params: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """One dense flat copy per (device, dtype) of ``params``, 16-bit floats widened
    to float32: ``(members, copy)`` pairs for :func:`unpack_by_kind`."""
    packed = []
    with torch.no_grad():
        for members in _by_kind(params).values():
            flat = torch.cat([_dense(p).reshape(-1) for p in members])
            if flat.dtype in LOW_PRECISION:
                flat = flat.float()
            packed.append((members, flat))
    return packed


def unpack_by_kind(members: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write ``flat`` (from :func:`pack_by_kind`) back into ``members``, keeping their layout and dtype."""
    offset = 0
    with torch.no_grad():
        for p in members:
            averaged = flat[offset : offset + p.numel()].view(p.shape)
            if p.layout == torch.strided:
                p.data.copy_(averaged)
            elif p.layout == torch.sparse_coo:
                p.data = averaged.to(p.dtype).to_sparse(layout=p.layout)
            else:
                p.data = averaged.to(p.dtype).to_sparse_csr()
            offset += p.numel()


def average_by_copy(params: list[torch.Tensor], group: Any) -> None:
    """For parameters that cannot be flattened: coalesce, reduce, copy back.
    16-bit floats are reduced in float32 and rounded once."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    for members, flat in pack_by_kind(params):
        flat /= size
        dist.all_reduce(flat, group=group)
        unpack_by_kind(members, flat)


def _dense(p: torch.Tensor) -> torch.Tensor:
    return p.data.to_dense() if p.layout != torch.strided else p.data
