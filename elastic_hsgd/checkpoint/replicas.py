"""The mean of saved replicas: pure functions over decoded payloads, and the collective that sums them.

Resuming at a new world size gives every new rank the mean of all saved
replicas: exactly what a global averaging step would have produced, so no
replica's work since the last global average is lost (shrink) or counted
twice (grow). Every floating-point tensor in the payload is averaged
(parameters, momentum, Adam's moments and its float ``step``); everything
else (integer and bool tensors, numbers, strings) must be equal in every
saved replica and is kept.

:func:`mean_of_replicas` is the collective: each rank reads its share of the
saved files, sums their floating tensors in float64, and one all_reduce adds
the shares up. The rest is pure.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collectives import Peers
from .commit import Unusable
from .layout import CommitRecord, saved_ranks_to_read, structure_rank
from .state import RNG_KEY
from .storage import CheckpointError


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
        """Add this payload's floating tensors, flattened in tree order, into ``accumulator``."""
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


def mean_of_replicas(record: CommitRecord, what: str, fetch: Callable[[int], dict[str, Any]], peers: Peers) -> dict[str, Any]:
    """Collective: the mean of every saved replica's floating state, identical on every rank.

    ``fetch(saved_rank)`` is a saved rank's decoded payload (from any tier).
    Each rank reads its share of the saved files (:func:`~.layout.saved_ranks_to_read`),
    sums their floating tensors in float64, and one all_reduce adds the shares up.
    Non-floating state that differs between saved replicas is a
    :class:`~.storage.CheckpointError` naming the first difference.
    """
    share = saved_ranks_to_read(peers.rank, peers.world_size, record.world_size)
    first: Split | None = None
    fingerprints: dict[int, str] = {}
    entries: dict[int, dict[str, str]] = {}
    error = None
    total = None
    try:
        for saved_rank in share or [structure_rank(peers.rank, peers.world_size, record.world_size)]:
            payload = fetch(saved_rank)
            payload.pop(RNG_KEY, None)
            part = split(payload)
            del payload
            if first is None:
                first, total = part, part.accumulator()
            fingerprints[saved_rank], entries[saved_rank] = part.fingerprint, part.entries
            if share:
                part.add_to(total)
            part.floats.clear()  # frees this file's buffer before the next is read
    except Exception as exc:  # noqa: BLE001 - agreed below
        error = exc
    peers.agree(error, what, soft=Unusable)
    assert first is not None and total is not None
    gathered: dict[int, str] = {}
    for prints in peers.gather(fingerprints):
        gathered.update(prints)
    differing = sorted(r for r, f in gathered.items() if f != gathered[0])
    if differing:
        everyone: dict[int, dict[str, str]] = {}
        for part_entries in peers.gather(entries):
            everyone.update(part_entries)
        detail = first_difference(everyone[0], everyone[differing[0]])
        raise CheckpointError(
            f"{what}: cannot average the saved replicas, their non-floating state differs "
            f"(saved ranks {differing[:8]} differ from saved rank 0; first difference {detail}). "
            "Integer state, such as step counters, must be equal on every rank; "
            "resume at the saved world size instead."
        )
    peers.sum_(total)
    total /= record.world_size
    return first.fill(total)
