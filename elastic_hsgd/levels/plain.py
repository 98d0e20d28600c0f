"""The plain level: torch's averaging, the parameters := their mean over the level's group.

Parameters are views of persistent flat buffers (:class:`~elastic_hsgd.flat_params.FlatParameterBuffers`),
so a sync is one in-place ``all_reduce`` per buffer (per chunk on CPU), with no
per-call copy of the model. Sparse or non-contiguous (e.g. channels_last)
parameters cannot be views of a buffer; they alone go through the copy path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..flat_params import LOW_PRECISION, FlatParameterBuffers, average_by_copy
from .base import Owner


def mean_in_place(buffers: list[torch.Tensor], group: dist.ProcessGroup, cpu_chunk_elements: int) -> None:
    """Each buffer := its mean over ``group`` (16-bit buffers reduced in float32).

    On CPU each buffer is reduced in chunks of ``cpu_chunk_elements``, so that
    dividing chunk k+1 overlaps the reduction of chunk k.

    Example::

        >>> # xdoctest: +SKIP("needs torch.distributed")
        >>> buffer = torch.full((8,), float(dist.get_rank()))
        >>> mean_in_place([buffer], dist.group.WORLD, cpu_chunk_elements=1 << 22)
    """
    size = dist.get_world_size(group)
    pending = []
    upcast: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for flat in buffers:
            if flat.dtype in LOW_PRECISION:
                # Summing world-size terms in 16 bits loses what torch's averager
                # (which concatenates mixed dtypes in float32) keeps: reduce in
                # float32, round once.
                wide = flat.float()
                upcast.append((flat, wide))
                flat = wide
            if flat.device.type == "cuda":
                # As torch's averager does: an all_reduce on another stream must
                # not race the optimizer's kernels still writing this buffer.
                torch.cuda.synchronize(flat.device)
                chunks = [flat]
            else:
                # On CPU, dividing chunk k+1 overlaps the reduction of chunk k,
                # which hides the division's pass over memory.
                chunks = list(flat.split(cpu_chunk_elements))
            for chunk in chunks:
                # Divide first, like torch, so results match it bit for bit.
                chunk.div_(size)
                pending.append(dist.all_reduce(chunk, group=group, async_op=True))
        for work in pending:
            work.wait()
        for narrow, wide in upcast:
            narrow.copy_(wide)


class PlainLevel:
    """Averages parameters over a level's group exactly as torch's averager does, with no extra memory.

    One object serves every plain level (it keeps no state per level); the
    anchored levels use its :meth:`mean_in_place` for their own means.

    Args:
        flat: the averager's flat buffers, shared with the other levels.
        owner: the averager (a weak proxy), read for ``CPU_CHUNK_ELEMENTS``.

    Example::

        >>> # xdoctest: +SKIP("needs torch.distributed")
        >>> level = PlainLevel(FlatParameterBuffers(), weakref.proxy(averager))
        >>> flat, by_copy = AveragingInputs().split(model.parameters())
        >>> level.average(flat, by_copy, dist.group.WORLD)
    """

    def __init__(self, flat: FlatParameterBuffers, owner: Owner) -> None:
        self._flat = flat
        self._owner = owner

    def average(self, params: list[torch.Tensor], by_copy: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        """``params`` averaged in their flat buffers, ``by_copy`` (sparse, channels_last) through copies."""
        if by_copy:
            average_by_copy(by_copy, group)
        if not params:
            return
        buffers = self._flat.buffers_for(params)
        if buffers is None:
            average_by_copy(params, group)
            return
        self.mean_in_place(buffers, group)

    def mean_in_place(self, buffers: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        """:func:`mean_in_place` with the averager's ``CPU_CHUNK_ELEMENTS``."""
        mean_in_place(buffers, group, self._owner.CPU_CHUNK_ELEMENTS)
