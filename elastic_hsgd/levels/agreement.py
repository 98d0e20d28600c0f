"""What the ranks of one averager agree on when its anchored levels are set up: the parameters'
layout, every rank's setup error, and the outer-optimizer state that is not averaged.

Set up means: the anchors are allocated (the first call at or after warmup), a loaded state is
applied, or the anchors re-agree after a membership change. Each rank tries the setup locally,
then one small object gather (over a short-lived gloo group, :func:`~elastic_hsgd.process_groups.agree`)
tells every rank what every other found, so that a rank whose parameters differ raises together
with the others instead of leaving them in the next collective until its timeout. Only at those
moments, never per step: a layout change on one rank later (a cast on that rank alone) still
raises there alone, since catching it would cost a collective on every sync.

Which optimizer state is averaged at a re-agreement: floating tensors of one or more
dimensions (Adam's moments, momentum). 0-d and integer state (step counts, NAdam's
``mu_product``) is taken as is, and must be equal on every rank.

Example::

    >>> import torch
    >>> mine = Outcome(layout_of([torch.zeros(3)]), None, [])
    >>> other = Outcome(layout_of([torch.zeros(4)]), None, [])
    >>> disagreement([mine, mine]) is None
    True
    >>> disagreement([mine, other]).split(":")[0]
    'the parameters being averaged differ between ranks'
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..collectives import combine_errors
from ..process_groups import agree
from .anchors import AnchoredLevel

#: ``(elements, dtype, device)`` of each flat parameter buffer, as text (the same on every machine).
Layout = list[tuple[int, str, str]]


def layout_of(buffers: Sequence[torch.Tensor]) -> Layout:
    """The layout of ``buffers``, to compare between calls and between ranks."""
    return [(b.numel(), str(b.dtype), str(b.device)) for b in buffers]


def describe(layout: Layout, with_device: bool = True) -> str:
    """``[(600, torch.float32, cpu)]``."""
    return "[" + ", ".join(f"({n}, {d}, {dev})" if with_device else f"({n}, {d})" for n, d, dev in layout) + "]"


def layout_error(have: Layout, got: Layout) -> str:
    """The error for parameters whose flat buffers are not those the anchors were built for, naming what changed.

    Example::

        >>> layout_error([(6, "torch.float32", "cpu")], [(6, "torch.float64", "cpu")]).split(" since")[0]
        'the parameters being averaged changed dtype torch.float32 -> torch.float64'
    """
    if len(have) == len(got) and all(h[0] == g[0] for h, g in zip(have, got)):
        changes = []
        for (_, dtype, device), (_, new_dtype, new_device) in zip(have, got):
            if dtype != new_dtype:
                changes.append(f"dtype {dtype} -> {new_dtype}")
            if device != new_device:
                changes.append(f"device {device} -> {new_device}")
        changed = ", ".join(dict.fromkeys(changes))
        return (
            f"the parameters being averaged changed {changed} since this averager's anchors were built "
            f"(flat buffers of (elements, dtype, device) {describe(have)} -> {describe(got)}): anchors, outer-"
            "optimizer state and wire buffers keep the dtype and device of the parameters at the first call at or "
            "after warmup. Cast or move the model (model.to(...)) before the first call to average_parameters, "
            "and keep it there."
        )
    return (
        f"the parameters being averaged form flat buffers of (elements, dtype, device) {describe(got)} but this "
        f"averager's anchors were built for {describe(have)}: pass the same parameters on every call."
    )


def optimizer_state(lv: AnchoredLevel) -> Iterator[tuple[str, Any]]:
    """``(label, value)`` of every entry of ``lv``'s outer-optimizer state, in the optimizer's order."""
    if lv.optimizer is None:
        return
    for index, state in enumerate(lv.optimizer.state.values()):
        for name, value in state.items():
            yield f"outer_optimizers[{lv.period}] state {name!r} of anchor {index}", value


def averaged(value: Any) -> bool:
    """Whether optimizer state ``value`` is averaged at a re-agreement: a floating tensor of one or more dimensions."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0


def kept_state(levels: Sequence[AnchoredLevel]) -> list[tuple[str, Any]]:
    """The optimizer state taken as is at a re-agreement (0-d and integer tensors, plain numbers), as plain values."""
    kept = []
    for lv in levels:
        for label, value in optimizer_state(lv):
            if not averaged(value):
                kept.append((label, value.tolist() if isinstance(value, torch.Tensor) else value))
    return kept


@dataclass(frozen=True)
class Outcome:
    """One rank's side of a setup: its parameters' layout, its error (``None``: it succeeded) and its kept state.

    ``cohort``: the ranks whose layouts must be equal. Every rank for plain
    parameters; for DTensor parameters, the ranks holding the same slices
    (their position in a replica), since the shards of an uneven split differ.
    """

    layout: Layout
    error: str | None
    kept: list[tuple[str, Any]]
    cohort: int = 0


def disagreement(outcomes: Sequence[Outcome]) -> str | None:
    """What is wrong with every rank's outcome, one message for all; ``None`` if they agree."""
    message = combine_errors([o.error for o in outcomes], "setting up the anchored levels (outer_optimizers/comm_dtypes)")
    if message is not None:
        return message
    # Elements and dtype: devices differ between ranks by design (cuda:0, cuda:1).
    cohorts: dict[int, set[tuple[tuple[int, str], ...]]] = {}
    for o in outcomes:
        cohorts.setdefault(o.cohort, set()).add(tuple((n, d) for n, d, _ in o.layout))
    if any(len(layouts) > 1 for layouts in cohorts.values()):
        ranks = "; ".join(f"rank {r}: {describe(o.layout, with_device=False)}" for r, o in enumerate(outcomes[:8]))
        return (
            f"the parameters being averaged differ between ranks: flat buffers of (elements, dtype) {ranks}. "
            "Build the same model on every rank and pass the same parameters."
        )
    for index, (label, value) in enumerate(outcomes[0].kept):
        values = [o.kept[index][1] if index < len(o.kept) else None for o in outcomes]
        if any(v != value for v in values):
            return (
                f"{label} differs between ranks ({values[:8]}): state that is not averaged (step counts) must be "
                "equal on every rank when the anchors re-agree; resume every rank from the same checkpoint step."
            )
    return None


def agree_on(outcome: Outcome, group: dist.ProcessGroup) -> None:
    """Collective over ``group``: raise ``ValueError`` on every rank unless every rank's outcome agrees."""
    message = disagreement(agree(outcome, group))
    if message is not None:
        raise ValueError(message)
