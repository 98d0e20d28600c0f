"""Mean in a wire dtype: a tensor averaged over a group in bf16, fp16 or int8 both ways, summed in fp32.

A reduce-scatter and an all-gather, each as one ``all_to_all`` per chunk
(gloo's all-gather is slower than its all-to-all), pipelined: a chunk is
encoded just before it is sent and decoded as soon as its mean is back, so
the passes over memory overlap the transfers. The encoding, the fp32 sum and
the decoding are the pure functions of :mod:`elastic_hsgd.outer`; the buffers
are made once per (device, elements, wire dtype, group size) and reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist

from .. import outer
from .base import Owner

#: Runs on elements ``[start, end)`` of the averaged tensor (``end`` excludes the wire's padding).
ChunkHook = Callable[[int, int], None]


@dataclass
class WireBuffers:
    """A compressed level's buffers for one (device, size, wire dtype, group size), reused every call."""

    wire: torch.Tensor
    received: torch.Tensor
    mean_out: torch.Tensor
    total: torch.Tensor
    row: torch.Tensor
    chunk: int
    wire_scales: torch.Tensor
    received_scales: torch.Tensor
    mean_scales: torch.Tensor
    work: torch.Tensor
    spare: torch.Tensor

    def scales_of(self, scales: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The int8 scales of wire elements ``[start, stop)`` (whole rows)."""
        return scales[start // outer.INT8_ROW : stop // outer.INT8_ROW]

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer, for storage checks."""
        return [v for v in (getattr(self, f.name) for f in fields(self)) if isinstance(v, torch.Tensor)]


class WireMean:
    """``x`` := its mean over a group, sent in a wire dtype both ways and summed in fp32.

    Args:
        owner: the averager (a weak proxy), read for ``CPU_WIRE_CHUNK_ELEMENTS``
            when buffers are made.

    Example::

        >>> # xdoctest: +SKIP("needs torch.distributed")
        >>> wire = WireMean(weakref.proxy(averager))
        >>> delta = anchor - params
        >>> wire.mean(delta, torch.bfloat16, dist.group.WORLD)  # delta is now the mean delta
    """

    def __init__(self, owner: Owner) -> None:
        self._owner = owner
        #: Buffers by (device, elements, wire dtype, group size).
        self.buffers: dict[tuple[Any, ...], WireBuffers] = {}

    def clear(self) -> None:
        """Forget every buffer (the parameters' layout changed)."""
        self.buffers = {}

    def mean(
        self,
        x: torch.Tensor,
        wire_dtype: torch.dtype,
        group: dist.ProcessGroup,
        before_encode: ChunkHook | None = None,
        after_decode: ChunkHook | None = None,
    ) -> None:
        """``x`` := its mean over ``group``, sent in ``wire_dtype``, chunk by chunk.

        ``before_encode(start, end)`` fills ``x[start:end]`` just before that
        chunk is cast into the wire buffer and sent (e.g. computes the
        pseudo-gradient there); ``after_decode(start, end)`` reads the chunk's
        mean as soon as it is cast back. Separate same-dtype passes and casting
        copies: on CPU, elementwise ops that mix dtypes are several times slower
        than both together.
        """
        buffers = self.buffers_for(x, wire_dtype, group)
        wire, numel = buffers.wire, x.numel()

        def produce(start: int, stop: int) -> None:
            end = min(stop, numel)
            if before_encode is not None:
                before_encode(start, end)
            # int8 quantizes in place when this chunk of x is fp32 whole rows (it is scratch now).
            whole = end == stop and x.dtype == torch.float32
            work = x[start:end] if whole else buffers.work[: stop - start]
            scales = buffers.scales_of(buffers.wire_scales, start, stop)
            outer.encode(x[start:end], wire[start:stop], scales, work, buffers.spare[: stop - start])

        def consume(start: int, stop: int) -> None:
            end = min(stop, numel)
            outer.decode(wire[start:stop], x[start:end], buffers.scales_of(buffers.wire_scales, start, stop), buffers.work)
            if after_decode is not None:
                after_decode(start, end)

        exchange(buffers, group, produce, consume)

    def buffers_for(self, x: torch.Tensor, wire_dtype: torch.dtype, group: dist.ProcessGroup) -> WireBuffers:
        """The buffers for averaging ``x`` over ``group`` in ``wire_dtype``, made at the first call."""
        size = dist.get_world_size(group)
        key = (x.device, x.numel(), wire_dtype, size)
        if key not in self.buffers:
            padded, _ = outer.wire_layout(x.numel(), size, wire_dtype)
            unit = size * (outer.INT8_ROW if wire_dtype == torch.int8 else 1)
            cpu_chunk = self._owner.CPU_WIRE_CHUNK_ELEMENTS
            chunk = padded if x.device.type == "cuda" else max(unit, cpu_chunk // unit * unit)
            chunk = min(chunk, padded) if padded else unit
            device = x.device
            rows = outer.scale_count(padded, wire_dtype)
            int8 = wire_dtype == torch.int8

            def fp32(n: int) -> torch.Tensor:
                return torch.empty(n, dtype=torch.float32, device=device)

            self.buffers[key] = WireBuffers(
                wire=torch.empty(padded, dtype=wire_dtype, device=device),  # my x, then the gathered mean
                received=torch.empty(padded, dtype=wire_dtype, device=device),  # everyone's slice of mine
                mean_out=torch.empty(padded, dtype=wire_dtype, device=device),  # my slice of the mean, once per rank
                total=fp32(chunk // size),  # fp32 sum of my slice
                row=fp32(chunk // size),  # one received slice in fp32
                chunk=chunk,
                wire_scales=fp32(rows),
                received_scales=fp32(rows),
                mean_scales=fp32(rows),
                work=fp32(chunk if int8 else 0),  # int8: quantization scratch
                spare=fp32(chunk if int8 else 0),
            )
        return self.buffers[key]


def exchange(
    buffers: WireBuffers,
    group: dist.ProcessGroup,
    produce: Callable[[int, int], None],
    consume: Callable[[int, int], None],
) -> None:
    """Average the wire buffer over ``group`` in the wire dtype both ways, summed in fp32.

    A reduce-scatter and an all-gather, each as one ``all_to_all`` (gloo's
    all-gather is slower than its all-to-all), over chunks:
    ``produce(start, stop)`` fills a chunk of the wire buffer just before it
    is sent, and ``consume(start, stop)`` reads the chunk's mean as soon as
    it is back, so the passes over memory overlap the transfers. int8 rows'
    scales travel beside their values, in their own all_to_all.
    """
    b = buffers
    wire, received, mean_out = b.wire, b.received, b.mean_out
    size = dist.get_world_size(group)
    int8 = wire.dtype == torch.int8
    bounds = [(start, min(start + b.chunk, wire.numel())) for start in range(0, wire.numel(), b.chunk)]

    def send(out: torch.Tensor, inp: torch.Tensor, out_scales: torch.Tensor, in_scales: torch.Tensor, start: int, stop: int) -> list[Any]:
        if wire.device.type == "cuda":
            torch.cuda.synchronize(wire.device)
        works = [dist.all_to_all_single(out[start:stop], inp[start:stop], group=group, async_op=True)]
        if int8:
            works.append(dist.all_to_all_single(
                b.scales_of(out_scales, start, stop), b.scales_of(in_scales, start, stop), group=group, async_op=True
            ))
        return works

    scatters = []
    for start, stop in bounds:
        produce(start, stop)
        scatters.append(send(received, wire, b.received_scales, b.wire_scales, start, stop))
    gathers = []
    for (start, stop), works in zip(bounds, scatters):
        for work in works:
            work.wait()
        per_rank = (stop - start) // size
        m = mean_out[start:stop]
        mine = m[:per_rank]
        m_scales = b.scales_of(b.mean_scales, start, stop)  # empty unless int8
        rows = m_scales.numel() // size
        outer.reduce_slices(
            received[start:stop], size, b.total[:per_rank], mine, b.row[:per_rank],
            b.scales_of(b.received_scales, start, stop), m_scales[:rows], b.spare[:per_rank],
        )
        # all_to_all sends slot j to rank j: every slot carries this rank's slice of the mean.
        m.view(size, per_rank)[1:].copy_(mine.expand(size - 1, per_rank))
        m_scales.view(size, rows)[1:].copy_(m_scales[:rows].expand(size - 1, rows))
        gathers.append(send(wire, mean_out, b.wire_scales, b.mean_scales, start, stop))
    for (start, stop), works in zip(bounds, gathers):
        for work in works:
            work.wait()
        consume(start, stop)
