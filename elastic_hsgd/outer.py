"""Pure math of one level's synchronization with an anchor (hierarchical DiLoCo).

A level that keeps an *anchor* (the parameters as they were when its group last
synchronized) syncs by averaging the pseudo-gradient ``delta = anchor - params``
over its group and stepping the anchor with it, instead of averaging the
parameters themselves. These functions are that math on flat tensors; they never
communicate. The averager calls them around its collectives, and the tests check
them against a float64 reference without processes.

Wire format of a compressed level (``comm_dtypes``): each rank casts its delta
to the wire dtype, every rank sums one ``1/n`` slice of everyone's wire values
in fp32 (a reduce-scatter), divides by ``n``, casts the mean back to the wire
dtype and the slices are gathered back. So both directions carry the wire dtype
(half the bytes of fp32 for bf16/fp16) while the sum itself is exact to fp32.

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

from collections.abc import Callable, Mapping, Sequence
import torch

#: dtypes a level may send its pseudo-gradient in.
WIRE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

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


def pseudo_gradient(anchor: torch.Tensor, params: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = anchor - params``: the step this rank took since the last sync, reversed."""
    return torch.sub(anchor, params, out=out)


def wire_layout(numel: int, group_size: int) -> tuple[int, int]:
    """``(padded, slice)``: a wire buffer of ``padded`` elements splits into ``group_size`` equal slices."""
    per_rank = -(-numel // group_size) if numel else 0
    return per_rank * group_size, per_rank


def encode(delta: torch.Tensor, wire: torch.Tensor) -> None:
    """Cast ``delta`` into the (padded) wire buffer; padding is zero."""
    numel = delta.numel()
    wire[:numel].copy_(delta)
    wire[numel:].zero_()


def reduce_slices(
    received: torch.Tensor, group_size: int, total: torch.Tensor, mine: torch.Tensor, row: torch.Tensor | None = None
) -> None:
    """Mean of ``group_size`` received wire slices: summed in fp32 into ``total``, cast into ``mine``.

    ``row`` is fp32 scratch of ``total``'s size: casting a row into it and adding
    fp32 to fp32 is several times faster on CPU than adding a bf16 row directly.
    """
    rows = received.view(group_size, -1)
    row = torch.empty_like(total) if row is None else row
    total.copy_(rows[0])
    for wire_row in rows[1:]:
        row.copy_(wire_row)
        total.add_(row)
    total.div_(group_size)
    mine.copy_(total)


def decode(wire: torch.Tensor, out: torch.Tensor) -> None:
    """The gathered mean, from the wire dtype into ``out`` (the parameters' dtype)."""
    out.copy_(wire[: out.numel()])


def simulate_compressed_mean(deltas: Sequence[torch.Tensor], wire_dtype: torch.dtype | None) -> torch.Tensor:
    """What every rank holds after averaging ``deltas`` at a level (for references and tests).

    Without a wire dtype: the exact mean in the deltas' dtype. With one: the
    same encode / fp32 sum / cast-back sequence the averager performs.
    """
    if wire_dtype is None:
        return torch.stack(list(deltas)).mean(0)
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
