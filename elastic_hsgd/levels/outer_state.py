"""The anchored levels' saved state: the ``"outer"`` entry of the averager's ``state_dict``.

Format (plain Python values and tensors, checked here before anything is applied)::

    {"levels": [[period, comm dtype name or None, has an outer optimizer], ...],
     "started": bool,
     # only when started:
     "anchors": {"<period>": [flat tensor per parameter buffer, ...]},
     "optimizers": {"<period>": optimizer.state_dict()},   # levels with an outer optimizer
     "in_flight": {...}}   # only with an overlapped sync in flight: see elastic_hsgd.levels.delayed
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .anchors import AnchoredLevel


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"``; ``None`` stays ``None``."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def level_options(levels: Sequence[AnchoredLevel]) -> list[list[Any]]:
    """``[period, comm dtype name, has an outer optimizer]`` per anchored level: what must match to load."""
    return [
        [lv.period, dtype_name(lv.comm_dtype), lv.optimizer is not None or lv.make_optimizer is not None]
        for lv in levels
    ]


def capture(levels: Sequence[AnchoredLevel], started: bool) -> dict[str, Any]:
    """The levels' state: options, and when ``started`` their anchors and outer optimizers'
    ``state_dict()`` (live references, as torch's are)."""
    state: dict[str, Any] = {"levels": level_options(levels), "started": started}
    if started:
        state["anchors"] = {str(lv.period): list(lv.anchors) for lv in levels}
        state["optimizers"] = {str(lv.period): lv.optimizer.state_dict() for lv in levels if lv.optimizer is not None}
    return state


def check_present(levels: Sequence[AnchoredLevel], saved: Mapping[str, Any] | None) -> bool:
    """Whether there is outer state to load; raises if the checkpoint and the averager disagree on having one."""
    if saved is None and not levels:
        return False
    if saved is None or not levels:
        raise ValueError(
            f"checkpoint has {'no ' if saved is None else ''}outer state (anchors / outer optimizers) but "
            f"this averager has {'none' if not levels else level_options(levels)}: configure "
            "outer_optimizers and comm_dtypes as when the checkpoint was saved (and sync_delays: a delayed "
            "level keeps an anchor too)."
        )
    return True


def check_options(levels: Sequence[AnchoredLevel], saved: Mapping[str, Any]) -> None:
    """Raise unless the checkpoint's anchored levels are configured as these."""
    saved_levels = [[int(p), d, bool(o)] for p, d, o in saved["levels"]]
    if saved_levels != level_options(levels):
        raise ValueError(
            f"checkpoint's anchored levels [period, comm dtype, outer optimizer] are {saved_levels} but this "
            f"averager has {level_options(levels)}: configure outer_optimizers and comm_dtypes as when "
            "the checkpoint was saved (and sync_delays: a delayed level keeps an anchor too)."
        )


def check_anchors_flat(levels: Sequence[AnchoredLevel], saved: Mapping[str, Any]) -> None:
    """Raise unless every saved anchor is a flat tensor."""
    for lv in levels:
        anchors = saved["anchors"][str(lv.period)]
        if not all(isinstance(a, torch.Tensor) and a.dim() == 1 for a in anchors):
            raise ValueError(f"checkpoint's anchors for period {lv.period} are not flat tensors.")


def apply(levels: Sequence[AnchoredLevel], saved: Mapping[str, Any]) -> None:
    """Copy saved anchors into the allocated ones and load the outer optimizers, level by level."""
    with torch.no_grad():
        for lv in levels:
            expected = [(a.numel(), a.dtype) for a in lv.anchors]
            anchors = saved["anchors"][str(lv.period)]
            got = [(a.numel(), a.dtype) for a in anchors]
            if got != expected:
                raise ValueError(
                    f"checkpoint's anchors for period {lv.period} have (elements, dtype) {got} but the "
                    f"parameters being averaged have {expected}: resume with the same model and "
                    "parameter set as the checkpoint."
                )
            lv.set_anchors(anchors)
            if lv.optimizer is not None:
                lv.optimizer.load_state_dict(saved["optimizers"][str(lv.period)])
