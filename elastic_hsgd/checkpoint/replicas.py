"""The mean of saved replicas, as pure functions over decoded payloads.

Resuming at a new world size gives every new rank the mean of all saved
replicas: exactly what a global averaging step would have produced, so no
replica's work since the last global average is lost (shrink) or counted
twice (grow). Every floating-point tensor in the payload is averaged
(parameters, momentum, Adam's moments and its float ``step``); everything
else (integer and bool tensors, numbers, strings) must be equal in every
saved replica and is kept.

Example::

    >>> import torch
    >>> a = split({"w": torch.tensor([1.0, 2.0]), "epoch": 3})
    >>> b = split({"w": torch.tensor([3.0, 6.0]), "epoch": 3})
    >>> total = a.accumulator(); a.add_to(total); b.add_to(total)
    >>> a.fingerprint == b.fingerprint
    True
    >>> a.fill(total / 2)
    {'w': tensor([2., 4.]), 'epoch': 3}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class _Slot:
    """Where a floating tensor sat in the tree: its span in the flat accumulator."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Split:
    """A payload taken apart: its floating tensors, and everything else."""

    skeleton: Any
    floats: list[torch.Tensor] = field(default_factory=list)
    numel: int = 0
    entries: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Equal for two payloads exactly when their structure, float shapes/dtypes and other values agree."""
        return hashlib.sha256(json.dumps(self.entries, sort_keys=True).encode()).hexdigest()

    def accumulator(self) -> torch.Tensor:
        """Zeros to sum replicas into: float64, so equal values (e.g. Adam's step) average back exactly."""
        return torch.zeros(self.numel, dtype=torch.float64)

    def add_to(self, accumulator: torch.Tensor) -> None:
        offset = 0
        for tensor in self.floats:
            n = tensor.numel()
            accumulator[offset : offset + n].add_(tensor.reshape(-1))
            offset += n

    def fill(self, flat: torch.Tensor) -> Any:
        """The tree with every floating tensor taken from ``flat``, cast back to its dtype."""
        return _fill(self.skeleton, flat)


def split(payload: Any) -> Split:
    """Take ``payload`` apart; non-floating tensors are cloned, so ``payload``'s buffer can be freed."""
    out = Split(skeleton=None)
    out.skeleton = _split(payload, out, "")
    return out


def _split(value: Any, out: Split, path: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            out.entries[path] = f"float {value.dtype} {list(value.shape)}"
            slot = _Slot(out.numel, tuple(value.shape), value.dtype)
            out.floats.append(value)
            out.numel += value.numel()
            return slot
        digest = hashlib.sha256(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        out.entries[path] = f"tensor {value.dtype} {list(value.shape)} sha256:{digest[:16]}"
        return value.clone()
    if isinstance(value, dict):
        out.entries[path] = f"dict {len(value)}"
        return {k: _split(v, out, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out.entries[path] = f"{type(value).__name__} {len(value)}"
        items = [_split(v, out, f"{path}/{i}") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    out.entries[path] = f"{type(value).__name__} {value!r}"[:200]
    return value


def _fill(node: Any, flat: torch.Tensor) -> Any:
    if isinstance(node, _Slot):
        n = 1
        for s in node.shape:
            n *= s
        return flat[node.offset : node.offset + n].reshape(node.shape).to(node.dtype)
    if isinstance(node, dict):
        return {k: _fill(v, flat) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        items = [_fill(v, flat) for v in node]
        return items if isinstance(node, list) else tuple(items)
    return node


def first_difference(a: dict[str, str], b: dict[str, str]) -> str:
    """The first entry where two payloads' ``entries`` differ, for an error message."""
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            return f"{path or '/'}: {a.get(path, 'missing')} vs {b.get(path, 'missing')}"
    return "no difference"
