"""How a state entry's saved replicas become one value at another world size: its merge policy.

A resume at a new world size gives every rank one value built from all the
saved replicas (:mod:`.replicas`). Each entry of ``state`` has a policy:

- ``"equal"`` (the default): floating-point tensors are averaged; everything
  else must be equal in every saved replica;
- ``"mean"``: numbers and tensors are averaged (integers rounded to the nearest);
- ``"min"`` / ``"max"``: the smallest / largest, elementwise for tensors;
- ``"rank0"``: saved rank 0's value.

Under every policy the entry's structure (keys, lengths, tensor shapes and
dtypes) and its strings and ``None`` s must agree. A few torch types that
drift per rank under local SGD have their own default (``merge=`` overrides it):
:class:`torch.amp.GradScaler` takes the smallest scale and a reset growth
tracker (the most cautious scale, counting its growth interval afresh);
:class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` takes saved rank 0's state.

Example::

    >>> combine("min", [65536.0, 32768.0]), combine("mean", [1, 2, 4]), combine("rank0", ["a", "b"])
    (32768.0, 2, 'a')
    >>> policies({"scaler": object()}, {"scaler": "max"})["scaler"]
    MergePolicy(kind='max', resets=())
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: The policies a user can name in ``CheckpointManager(merge=...)``.
POLICIES = ("equal", "rank0", "min", "max", "mean")


@dataclass(frozen=True)
class MergePolicy:
    """One entry's policy: how to combine its replicas (``kind``), then top-level keys set to fixed values."""

    kind: str = "equal"
    resets: tuple[tuple[str, Any], ...] = ()

    def apply_resets(self, merged: Any) -> Any:
        """``merged`` with :attr:`resets` applied (a dict entry only)."""
        if self.resets and isinstance(merged, dict):
            merged.update({key: value for key, value in self.resets if key in merged})
        return merged


EQUAL = MergePolicy()


def check_merge(merge: Mapping[str, str] | None) -> dict[str, str]:
    """``merge=`` checked: entry names to one of :data:`POLICIES`; ``ValueError`` names a bad one."""
    if merge is None:
        return {}
    if not isinstance(merge, Mapping):
        raise ValueError(f"merge={merge!r} must be a dict of state entry names to one of {', '.join(map(repr, POLICIES))}.")
    for name, kind in merge.items():
        if not isinstance(name, str) or kind not in POLICIES:
            raise ValueError(
                f"merge={dict(merge)!r}: entry {name!r} has policy {kind!r}; a policy is one of "
                f"{', '.join(map(repr, POLICIES))} (how its replicas combine at another world size)."
            )
    return dict(merge)


def default_policy(obj: Any) -> MergePolicy:
    """The policy of an entry nobody named in ``merge=``, by the entry's type."""
    if isinstance(obj, torch.amp.GradScaler):
        return MergePolicy("min", resets=(("_growth_tracker", 0),))
    if isinstance(obj, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return MergePolicy("rank0")
    return EQUAL


def policies(state: Mapping[str, Any], merge: Mapping[str, str] | None) -> dict[str, MergePolicy]:
    """Every entry's policy: the one ``merge`` names, else its type's default."""
    merge = merge or {}
    return {name: MergePolicy(merge[name]) if name in merge else default_policy(obj) for name, obj in state.items()}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def combine(kind: str, values: list[Any]) -> Any:
    """One value from every saved replica's ``values`` (numbers, bools, tensors) under policy ``kind``.

    ``ValueError`` when the policy cannot combine them (differing values
    under ``"equal"``, differing bools under ``"mean"``).
    """
    first = values[0]
    if kind == "rank0":
        return first
    if isinstance(first, torch.Tensor):
        stacked = torch.stack(values)
        if kind == "min":
            return stacked.amin(0)
        if kind == "max":
            return stacked.amax(0)
        if kind == "mean" and first.dtype != torch.bool:
            mean = stacked.double().mean(0)
            return (mean if first.is_floating_point() or first.is_complex() else mean.round()).to(first.dtype)
        if all(torch.equal(v, first) for v in values):
            return first
        raise ValueError(f"tensors of dtype {first.dtype} differ between saved replicas")
    if kind in ("min", "max"):
        return (min if kind == "min" else max)(values)
    if kind == "mean" and all(_number(v) for v in values):
        mean = sum(values) / len(values)
        return mean if any(isinstance(v, float) for v in values) else round(mean)
    if all(v == first for v in values):
        return first
    raise ValueError(f"values {values[:4]} differ between saved replicas")
