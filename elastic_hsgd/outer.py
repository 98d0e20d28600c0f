"""Pure math of one level's synchronization with an anchor (hierarchical DiLoCo).

A level that keeps an *anchor* (the parameters as they were when its group last
synchronized) syncs by averaging the pseudo-gradient ``delta = anchor - params``
over its group and stepping the anchor with it, instead of averaging the
parameters themselves. These functions are that math on flat tensors; they never
communicate. The levels (:mod:`elastic_hsgd.levels`) call them around their
collectives, and the tests check them against a float64 reference without
processes.

Wire format of a compressed level (``comm_dtypes``): each rank casts its delta
to the wire dtype, every rank sums one ``1/n`` slice of everyone's wire values
in fp32 (a reduce-scatter), divides by ``n``, casts the mean back to the wire
dtype and the slices are gathered back. So both directions carry the wire dtype
(half the bytes of fp32 for bf16/fp16) while the sum itself is exact to fp32.

int8 (``torch.int8``) adds per-row scales: the pseudo-gradient is cut into rows
of :data:`INT8_ROW` consecutive elements, each sent as int8 values
``round(x / scale)`` with one fp32 ``scale = max|x| / 127`` per row; the fp32
sum dequantizes every rank's rows, and the mean is quantized again (new scales)
for the way back. A quarter of fp32's bytes plus 4 bytes per row each way.
Slices are whole rows, so rows are the same on every rank and in
:func:`simulate_compressed_mean`, whatever the group size or chunking.

Example::

    >>> import torch
    >>> from elastic_hsgd.outer import pseudo_gradient, outer_update, simulate_compressed_mean
    >>> anchor = torch.tensor([1.0, 2.0])
    >>> params = [torch.tensor([0.5, 2.5]), torch.tensor([1.5, 1.5])]
    >>> deltas = [pseudo_gradient(anchor, p, torch.empty(2)) for p in params]
    >>> mean = simulate_compressed_mean(deltas, torch.bfloat16)
    >>> outer_update(anchor, mean, optimizer=None)  # plain: anchor -= mean delta
    >>> anchor
    tensor([1., 2.])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

#: dtypes a level may send its pseudo-gradient in (int8 with per-row scales).
WIRE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.int8)

#: Elements per int8 row: one fp32 scale each (1.6 % more bytes than the int8 values).
INT8_ROW = 256
_INT8_MAX = 127.0
_TINY = torch.finfo(torch.float32).tiny

OuterOptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def check_level_options(
    periods: Sequence[int],
    outer_optimizers: Mapping[int, OuterOptimizerFactory] | None,
    comm_dtypes: Mapping[int, torch.dtype] | None,
) -> tuple[dict[int, OuterOptimizerFactory], dict[int, torch.dtype]]:
    """Validate ``outer_optimizers`` / ``comm_dtypes`` against the configured periods."""
    outer = dict(outer_optimizers or {})
    wire = dict(comm_dtypes or {})
    for name, mapping in (("outer_optimizers", outer), ("comm_dtypes", wire)):
        for period in mapping:
            if period not in periods:
                raise ValueError(
                    f"{name} has period {period!r}, which is not a configured period {list(periods)}: "
                    f"key {name} by the periods of period_group_size_dict."
                )
    for period, factory in outer.items():
        if not callable(factory):
            raise TypeError(
                f"outer_optimizers[{period}] is {factory!r}, not a callable: pass a function of a list of "
                "tensors returning an optimizer, e.g. functools.partial(torch.optim.SGD, lr=0.7, "
                "momentum=0.9, nesterov=True)."
            )
    for period, dtype in wire.items():
        if dtype not in WIRE_DTYPES:
            raise ValueError(
                f"comm_dtypes[{period}] is {dtype!r}: supported wire dtypes are "
                f"{[str(d) for d in WIRE_DTYPES]} (omit the period to send parameters' own dtype)."
            )
    return outer, wire


def check_averager_options(
    periods: Sequence[int],
    outer_optimizers: Mapping[int, OuterOptimizerFactory] | None,
    comm_dtypes: Mapping[int, torch.dtype] | None,
    sync_delays: Mapping[int, int] | None,
    replicas_top: bool,
    warmup_steps: int = 0,
) -> tuple[dict[int, OuterOptimizerFactory], dict[int, torch.dtype], dict[int, int]]:
    """:func:`check_level_options` and :func:`check_sync_delays`; with a ``"replicas"`` top
    level (``replicas_top``), no comm dtype on it. Returns the three mappings, checked;
    ``warmup_steps`` must be a non-negative int, and a top period of 1 warns."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps {warmup_steps!r} must be a non-negative int (0 averages from step 0).")
    if periods[-1] == 1:
        warnings.warn(
            "The largest period in period_group_size_dict is 1: averaging parameters every "
            "step costs no less than DistributedDataParallel's gradient all-reduce; use plain "
            "DDP instead.",
            stacklevel=3,
        )
    factories, wires = check_level_options(periods, outer_optimizers, comm_dtypes)
    top = periods[-1]
    if replicas_top and top in wires:
        raise ValueError(
            f"comm_dtypes[{top}] is set on the 'replicas' level, which averages through "
            "torchft's fp32 allreduce: leave it out there (an outer optimizer is fine) and put "
            "comm_dtypes on the levels inside the replica group."
        )
    return factories, wires, check_sync_delays(periods, sync_delays)


def check_sync_delays(
    periods: Sequence[int], sync_delays: Mapping[int, int] | None
) -> dict[int, int]:
    """Validate ``sync_delays`` (period -> tau) against the configured periods; zeros are left out.

    ``0 <= tau < period``: the sync of a level that fires at step ``s`` completes at
    step ``s + tau``, before the level could fire again.
    """
    delays: dict[int, int] = {}
    for period, tau in dict(sync_delays or {}).items():
        if period not in periods:
            raise ValueError(
                f"sync_delays has period {period!r}, which is not a configured period {list(periods)}: "
                "key sync_delays by the periods of period_group_size_dict."
            )
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
            raise ValueError(
                f"sync_delays[{period}] is {tau!r}: it must be a non-negative int, the steps the level's "
                "sync runs behind training (0: synchronous)."
            )
        if tau >= period:
            raise ValueError(
                f"sync_delays[{period}] is {tau}, not below the level's period {period}: a sync must complete "
                f"before the level fires again; use a delay of at most {period - 1}."
            )
        if tau:
            delays[period] = tau
    return delays


def pseudo_gradient(anchor: torch.Tensor, params: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = anchor - params``: the step this rank took since the last sync, reversed."""
    return torch.sub(anchor, params, out=out)


def wire_layout(numel: int, group_size: int, wire_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """``(padded, slice)``: a wire buffer of ``padded`` elements splits into ``group_size`` equal slices
    (for int8, slices of whole :data:`INT8_ROW` rows)."""
    unit = INT8_ROW if wire_dtype == torch.int8 else 1
    per_rank = -(-numel // (group_size * unit)) * unit if numel else 0
    return per_rank * group_size, per_rank


def scale_count(wire_elements: int, wire_dtype: torch.dtype) -> int:
    """Scales that travel with ``wire_elements`` wire values: one per int8 row, none for a cast."""
    return wire_elements // INT8_ROW if wire_dtype == torch.int8 else 0


def quantize_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, work: torch.Tensor, spare: torch.Tensor) -> None:
    """Rows of ``x`` into int8 ``q`` and fp32 ``scales`` (``q`` has whole rows; past ``x`` it is zero).

    ``work`` and ``spare`` are fp32 scratch of ``q``'s length; ``x`` may be
    ``work`` itself (then it is overwritten). Scales of all-zero rows are 0.
    """
    numel, rows = x.numel(), q.numel() // INT8_ROW
    values = work[: rows * INT8_ROW]
    if x.data_ptr() != values.data_ptr() or x.dtype != values.dtype:
        values[:numel].copy_(x)
    values[numel:].zero_()
    grid = values.view(rows, INT8_ROW)
    magnitude = spare[: rows * INT8_ROW].view(rows, INT8_ROW)
    torch.abs(grid, out=magnitude)
    torch.amax(magnitude, dim=1, out=scales[:rows])
    scales[:rows].div_(_INT8_MAX)
    safe = magnitude[:, 0]  # a column of the scratch: the scales, never zero (an all-zero row stays 0)
    torch.clamp(scales[:rows], min=_TINY, out=safe)
    grid.div_(safe.unsqueeze(1))
    values.round_()
    q.copy_(values)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, work: torch.Tensor | None = None) -> None:
    """``out = q * scale`` per row (``out`` may be shorter than ``q``: the padding is dropped)."""
    numel, rows = out.numel(), q.numel() // INT8_ROW
    if out.dtype == torch.float32 and numel == rows * INT8_ROW:
        out.copy_(q)
        out.view(rows, INT8_ROW).mul_(scales[:rows].unsqueeze(1))
        return
    values = work[: rows * INT8_ROW] if work is not None else torch.empty(rows * INT8_ROW, device=q.device)
    values.copy_(q)
    values.view(rows, INT8_ROW).mul_(scales[:rows].unsqueeze(1))
    out.copy_(values[:numel])


def encode(
    delta: torch.Tensor,
    wire: torch.Tensor,
    scales: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
    spare: torch.Tensor | None = None,
) -> None:
    """``delta`` into the (padded) wire buffer; padding is zero.

    A cast for bf16/fp16; int8 rows with their ``scales`` (``work``/``spare``:
    fp32 scratch of the wire's length, see :func:`quantize_int8`).
    """
    numel = delta.numel()
    if wire.dtype == torch.int8:
        assert scales is not None
        work = torch.empty(wire.numel(), device=wire.device) if work is None else work
        spare = torch.empty(wire.numel(), device=wire.device) if spare is None else spare
        quantize_int8(delta, wire, scales, work, spare)
        return
    wire[:numel].copy_(delta)
    wire[numel:].zero_()


def reduce_slices(
    received: torch.Tensor,
    group_size: int,
    total: torch.Tensor,
    mine: torch.Tensor,
    row: torch.Tensor | None = None,
    received_scales: torch.Tensor | None = None,
    mine_scales: torch.Tensor | None = None,
    spare: torch.Tensor | None = None,
) -> None:
    """Mean of ``group_size`` received wire slices: summed in fp32 into ``total``, into ``mine``.

    ``row`` is fp32 scratch of ``total``'s size: casting a row into it and adding
    fp32 to fp32 is several times faster on CPU than adding a bf16 row directly.
    int8: each slice is dequantized with its ``received_scales`` before the sum,
    and the mean quantized again into ``mine`` and ``mine_scales`` (``spare``:
    fp32 scratch of ``total``'s size; ``total`` is overwritten).
    """
    rows = received.view(group_size, -1)
    row = torch.empty_like(total) if row is None else row
    if received.dtype == torch.int8:
        assert received_scales is not None and mine_scales is not None
        scales = received_scales.view(group_size, -1)
        dequantize_int8(rows[0], scales[0], total)
        for wire_row, row_scales in zip(rows[1:], scales[1:]):
            dequantize_int8(wire_row, row_scales, row)
            total.add_(row)
        total.div_(group_size)
        quantize_int8(total, mine, mine_scales, total, torch.empty_like(total) if spare is None else spare)
        return
    total.copy_(rows[0])
    for wire_row in rows[1:]:
        row.copy_(wire_row)
        total.add_(row)
    total.div_(group_size)
    mine.copy_(total)


def decode(wire: torch.Tensor, out: torch.Tensor, scales: torch.Tensor | None = None, work: torch.Tensor | None = None) -> None:
    """The gathered mean, from the wire into ``out`` (the parameters' dtype)."""
    if wire.dtype == torch.int8:
        assert scales is not None
        dequantize_int8(wire, scales, out, work)
        return
    out.copy_(wire[: out.numel()])


def simulate_compressed_mean(deltas: Sequence[torch.Tensor], wire_dtype: torch.dtype | None) -> torch.Tensor:
    """What every rank holds after averaging ``deltas`` at a level (for references and tests).

    Without a wire dtype: the exact mean in the deltas' dtype. With one: the
    same encode / fp32 sum / decode sequence the averager performs.
    """
    if wire_dtype is None:
        return torch.stack(list(deltas)).mean(0)
    if wire_dtype == torch.int8:
        numel = deltas[0].numel()
        padded, _ = wire_layout(numel, 1, torch.int8)
        rows = scale_count(padded, torch.int8)
        total, row = torch.empty(padded), torch.empty(padded)
        for i, delta in enumerate(deltas):
            q, scales = torch.empty(padded, dtype=torch.int8), torch.empty(rows)
            quantize_int8(delta, q, scales, torch.empty(padded), torch.empty(padded))
            dequantize_int8(q, scales, total if i == 0 else row)
            if i:
                total.add_(row)
        total.div_(len(deltas))
        q, scales = torch.empty(padded, dtype=torch.int8), torch.empty(rows)
        quantize_int8(total, q, scales, torch.empty(padded), torch.empty(padded))
        out = torch.empty(numel, dtype=deltas[0].dtype)
        dequantize_int8(q, scales, out)
        return out
    summed = torch.stack([d.to(wire_dtype).float() for d in deltas]).sum(0) / len(deltas)
    return summed.to(wire_dtype).to(deltas[0].dtype)


def outer_update(anchor: torch.Tensor, mean_delta: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Step ``anchor`` with the averaged pseudo-gradient.

    With an optimizer (built over this anchor), ``anchor.grad = mean_delta``
    and one ``step()``; without, ``anchor -= mean_delta``. Several anchors may
    share an optimizer: set every grad first, then call :func:`outer_step`.
    """
    if optimizer is None:
        anchor.sub_(mean_delta)
    else:
        anchor.grad = mean_delta
        outer_step(optimizer, [anchor])


def outer_step(optimizer: torch.optim.Optimizer, anchors: Sequence[torch.Tensor]) -> None:
    """One outer step of ``optimizer`` with the anchors' grads already set; grads are released after."""
    optimizer.step()
    for anchor in anchors:
        anchor.grad = None


def delayed_correction(params: torch.Tensor, anchor: torch.Tensor, snapshot: torch.Tensor, out: torch.Tensor) -> None:
    """An overlapped sync's end: ``params += anchor - snapshot``.

    ``anchor`` is the anchor stepped with the mean of ``anchor_old - snapshot``,
    ``snapshot`` the parameters when the sync started: the local steps taken
    while it was in flight are kept on top of the new anchor. ``out`` (on the
    parameters' device, e.g. the pseudo-gradient buffer, or ``snapshot``
    itself) holds ``anchor - snapshot``. With no local step since the snapshot
    the result is the anchor (up to one rounding).
    """
    if anchor.device == out.device:
        torch.sub(anchor, snapshot, out=out)
    else:
        out.copy_(anchor)
        out.sub_(snapshot)
    params.add_(out)
