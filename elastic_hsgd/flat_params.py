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
from collections.abc import Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)


def params_to_average(params: Iterable[Any], *, with_grad_only: bool = True) -> list[torch.Tensor]:
    """Parameters that have a gradient, from ``model.parameters()`` or
    ``optimizer.param_groups``, each once (tied parameters are averaged once).

    ``with_grad_only=False`` takes those that require one instead: a process
    that has not stepped yet (e.g. joining replica groups) has no gradients.
    """
    selected: list[torch.Tensor] = []
    seen: set[int] = set()

    def take(tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"cannot average {type(tensor).__name__!r}: pass model.parameters() or "
                "optimizer.param_groups."
            )
        wanted = tensor.grad is not None if with_grad_only else tensor.requires_grad
        if wanted and id(tensor) not in seen:
            seen.add(id(tensor))
            selected.append(tensor)

    for item in params:
        if isinstance(item, dict):
            for tensor in item["params"]:
                take(tensor)
        else:
            take(item)
    return selected


def _by_kind(params: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """Parameters grouped by (device, dtype), order kept: one buffer or reduction each."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return groups


def _flattenable(tensor: torch.Tensor) -> bool:
    return tensor.layout == torch.strided and tensor.is_contiguous()


class FlatParameterBuffers:
    """One contiguous buffer per (device, dtype) backing a fixed list of parameters."""

    def __init__(self) -> None:
        self._ids: tuple[int, ...] = ()
        self._pointers: tuple[int, ...] = ()
        self._buffers: list[torch.Tensor] = []

    def buffers_for(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The flat buffers holding exactly ``params``, re-flattening if needed.

        Returns ``None`` when the parameters cannot live in a flat buffer
        (sparse or non-contiguous); the caller then averages by copying.
        """
        ids = tuple(id(p) for p in params)
        pointers = tuple(p.data_ptr() for p in params)
        if ids == self._ids and pointers == self._pointers and self._buffers:
            return self._buffers
        if not all(_flattenable(p) for p in params):
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


def average_by_copy(params: list[torch.Tensor], group: Any) -> None:
    """Fallback for parameters that cannot be flattened: coalesce, reduce, copy back."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    with torch.no_grad():
        for members in _by_kind(params).values():
            flat = torch.cat([p.data.reshape(-1) for p in members])
            flat /= size
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in members:
                p.data.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
