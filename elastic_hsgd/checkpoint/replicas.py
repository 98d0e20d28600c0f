"""The saved replicas merged into one state: pure functions over decoded payloads, and the collective that merges them.

Resuming at a new world size gives every new rank one state built from all
saved replicas, entry by entry under its merge policy (:mod:`.merge`). Under
the default, ``"equal"``, every floating-point tensor is averaged: exactly
what a global averaging step would have produced, so no replica's work since
the last global average is lost (shrink) or counted twice (grow); everything
else (integer and bool tensors, numbers, strings) must be equal in every
saved replica and is kept. Under ``"mean"``, ``"min"``, ``"max"`` and
``"rank0"``, numbers and tensors are combined that way instead.

:func:`mean_of_replicas` is the collective: each rank reads its share of the
saved files and folds their floating tensors into float64 accumulators (a sum,
or an elementwise min or max), one all_reduce per kind completes them, and the
few other values that a policy combines are gathered. The rest is pure.

Example::

    >>> import torch
    >>> a = split({"w": torch.tensor([1.0, 2.0]), "epoch": 3})
    >>> b = split({"w": torch.tensor([3.0, 6.0]), "epoch": 3})
    >>> totals = a.accumulators(); a.add_to(totals, 0); b.add_to(totals, 1)
    >>> a.fingerprint == b.fingerprint
    True
    >>> totals["mean"] /= 2
    >>> a.fill(totals, [])
    {'w': tensor([2., 4.]), 'epoch': 3}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collectives import Peers
from .commit import Unusable
from .layout import CommitRecord, saved_ranks_to_read, structure_rank
from .merge import EQUAL, MergePolicy, combine
from .sharded import is_record
from .state import RNG_KEY
from .storage import CheckpointError

#: Where a floating tensor of each policy goes: one float64 accumulator per kind, all_reduced with its op.
_ACCUMULATOR = {"equal": "mean", "mean": "mean", "min": "min", "max": "max", "rank0": "rank0"}
_INITIAL = {"mean": 0.0, "rank0": 0.0, "min": float("inf"), "max": float("-inf")}
_REDUCE_OP = {"mean": "sum", "rank0": "sum", "min": "min", "max": "max"}


@dataclass(frozen=True)
class _Slot:
    """Where a floating tensor sat in the tree: its span in accumulator ``kind``."""

    kind: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Small:
    """A number, bool or non-floating tensor that a policy combines: its index in :attr:`Split.smalls`."""

    index: int
    kind: str
    path: str
    tensor: tuple[torch.dtype, tuple[int, ...]] | None  # a tensor's dtype and shape; None: a Python value


@dataclass
class Split:
    """A payload taken apart: its floating tensors, the small values a policy combines, and everything else."""

    skeleton: Any
    floats: list[tuple[_Slot, torch.Tensor]] = field(default_factory=list)
    numel: dict[str, int] = field(default_factory=dict)
    smalls: list[Any] = field(default_factory=list)  # plain values (tensors as lists), to be gathered
    small_slots: list[_Small] = field(default_factory=list)
    entries: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Equal for two payloads exactly when their structure, tensor shapes/dtypes and kept values agree."""
        return hashlib.sha256(json.dumps(self.entries, sort_keys=True).encode()).hexdigest()

    def accumulators(self) -> dict[str, torch.Tensor]:
        """float64 accumulators to fold replicas into (exact for equal values, e.g. Adam's step), by kind."""
        return {kind: torch.full((n,), _INITIAL[kind], dtype=torch.float64) for kind, n in self.numel.items()}

    def add_to(self, totals: dict[str, torch.Tensor], saved_rank: int) -> None:
        """Fold this payload (saved rank ``saved_rank``'s) into ``totals``."""
        for slot, tensor in self.floats:
            span = totals[slot.kind][slot.offset : slot.offset + tensor.numel()]
            flat = tensor.reshape(-1)
            if slot.kind == "mean":
                span.add_(flat)
            elif slot.kind == "min":
                torch.minimum(span, flat.to(torch.float64), out=span)
            elif slot.kind == "max":
                torch.maximum(span, flat.to(torch.float64), out=span)
            elif saved_rank == 0:  # "rank0"
                span.copy_(flat)

    def fill(self, totals: dict[str, torch.Tensor], merged: list[Any]) -> Any:
        """The tree with every floating tensor taken from ``totals`` (cast back, in memory of its own)
        and every small value from ``merged``."""
        return _fill(self.skeleton, totals, merged)


def split(payload: Any, policies: Mapping[str, MergePolicy] | None = None) -> Split:
    """Take ``payload`` apart, each top-level entry under its policy (default ``"equal"``).

    Non-floating tensors are cloned, so ``payload``'s buffer can be freed.
    """
    out = Split(skeleton=None)
    if isinstance(payload, dict):
        out.entries[""] = f"dict {len(payload)}"
        out.skeleton = {k: _split(v, out, f"/{k}", (policies or {}).get(k, EQUAL).kind) for k, v in payload.items()}
    else:
        out.skeleton = _split(payload, out, "", "equal")
    return out


def _split(value: Any, out: Split, path: str, kind: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            out.entries[path] = f"float {value.dtype} {list(value.shape)}"
            accumulator = _ACCUMULATOR[kind]
            slot = _Slot(accumulator, out.numel.get(accumulator, 0), tuple(value.shape), value.dtype)
            out.floats.append((slot, value))
            out.numel[accumulator] = slot.offset + value.numel()
            return slot
        if kind != "equal":
            out.entries[path] = f"{kind} tensor {value.dtype} {list(value.shape)}"
            return _small(out, kind, path, value.tolist(), (value.dtype, tuple(value.shape)))
        digest = hashlib.sha256(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        out.entries[path] = f"tensor {value.dtype} {list(value.shape)} sha256:{digest[:16]}"
        return value.clone()
    if isinstance(value, dict):
        out.entries[path] = f"dict {len(value)}"
        return {k: _split(v, out, f"{path}/{k}", kind) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out.entries[path] = f"{type(value).__name__} {len(value)}"
        items = [_split(v, out, f"{path}/{i}", kind) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if kind != "equal" and isinstance(value, (bool, int, float)):
        out.entries[path] = f"{kind} {type(value).__name__}"
        return _small(out, kind, path, value, None)
    out.entries[path] = f"{type(value).__name__} {value!r}"[:200]
    return value


def _small(out: Split, kind: str, path: str, value: Any, tensor: tuple[torch.dtype, tuple[int, ...]] | None) -> _Small:
    slot = _Small(len(out.smalls), kind, path, tensor)
    out.smalls.append(value)
    out.small_slots.append(slot)
    return slot


def _fill(node: Any, totals: dict[str, torch.Tensor], merged: list[Any]) -> Any:
    if isinstance(node, _Slot):
        n = 1
        for s in node.shape:
            n *= s
        # A copy even where the dtype is float64: a view would keep the whole accumulator alive.
        return totals[node.kind][node.offset : node.offset + n].reshape(node.shape).to(node.dtype, copy=True)
    if isinstance(node, _Small):
        return merged[node.index]
    if isinstance(node, dict):
        return {k: _fill(v, totals, merged) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        items = [_fill(v, totals, merged) for v in node]
        return items if isinstance(node, list) else tuple(items)
    return node


def first_difference(a: dict[str, str], b: dict[str, str]) -> str:
    """The first entry where two payloads' ``entries`` differ, for an error message."""
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            return f"{path or '/'}: {a.get(path, 'missing')} vs {b.get(path, 'missing')}"
    return "no difference"


def _entry_of(detail: str) -> str:
    """The state entry a :func:`first_difference` is in (``"/scaler/_growth_tracker: ..."`` -> ``"scaler"``)."""
    return detail.split(":", 1)[0].split("/")[1] if detail.startswith("/") else ""


def merge_smalls(first: Split, values: dict[int, list[Any]], saved_world: int, what: str) -> list[Any]:
    """Each small value of ``first``, combined over every saved rank's ``values`` under its policy."""
    merged = []
    for slot in first.small_slots:
        replicas = [values[r][slot.index] for r in range(saved_world)]
        if slot.tensor is not None:
            dtype, shape = slot.tensor
            replicas = [torch.tensor(v, dtype=dtype).reshape(shape) for v in replicas]
        try:
            merged.append(combine(slot.kind, replicas))
        except ValueError as exc:
            raise CheckpointError(f"{what}: cannot merge {slot.path} under merge policy {slot.kind!r}: {exc}") from None
    return merged


def mean_of_replicas(
    record: CommitRecord,
    what: str,
    fetch: Callable[[int], dict[str, Any]],
    peers: Peers,
    policies: Mapping[str, MergePolicy] | None = None,
) -> dict[str, Any]:
    """Collective: every saved replica merged entry by entry (``policies``; default the mean), identical on every rank.

    ``fetch(saved_rank)`` is a saved rank's decoded payload (from any tier).
    Each rank reads its share of the saved files (:func:`~.layout.saved_ranks_to_read`),
    folds their floating tensors into float64 accumulators, and one all_reduce
    per kind completes them. State an entry's policy does not combine that
    differs between saved replicas is a :class:`~.storage.CheckpointError`
    naming the entry, the first difference and the ``merge=`` fix.
    """
    policies = dict(policies or {})
    share = saved_ranks_to_read(peers.rank, peers.world_size, record.world_size)
    first: Split | None = None
    fingerprints: dict[int, str] = {}
    entries: dict[int, dict[str, str]] = {}
    smalls: dict[int, list[Any]] = {}
    error = None
    totals: dict[str, torch.Tensor] = {}
    try:
        for saved_rank in share or [structure_rank(peers.rank, peers.world_size, record.world_size)]:
            payload = fetch(saved_rank)
            payload.pop(RNG_KEY, None)
            part = split(payload, policies)
            del payload
            if first is None:
                first, totals = part, part.accumulators()
            fingerprints[saved_rank], entries[saved_rank] = part.fingerprint, part.entries
            if share:
                part.add_to(totals, saved_rank)
                smalls[saved_rank] = part.smalls
            part.floats.clear()  # frees this file's buffer before the next is read
    except Exception as exc:  # noqa: BLE001 - agreed below
        error = exc
    peers.agree(error, what, soft=Unusable)
    assert first is not None
    gathered: dict[int, str] = {}
    for prints in peers.gather(fingerprints):
        gathered.update(prints)
    differing = sorted(r for r, f in gathered.items() if f != gathered[0])
    if differing:
        everyone: dict[int, dict[str, str]] = {}
        for part_entries in peers.gather(entries):
            everyone.update(part_entries)
        detail = first_difference(everyone[0], everyone[differing[0]])
        sharded = _sharded_entry(first.skeleton)
        if sharded is not None:  # each saved rank's own shard, loaded into state that is not sharded
            raise CheckpointError(_not_sharded_message(what, sharded, record.world_size, peers.world_size))
        raise CheckpointError(_differing_message(what, differing, detail, policies))
    for kind, total in totals.items():
        peers.reduce_(total, _REDUCE_OP[kind])
    if "mean" in totals:
        totals["mean"] /= record.world_size
    merged: list[Any] = []
    if first.small_slots:
        values: dict[int, list[Any]] = {}
        for part_smalls in peers.gather(smalls):
            values.update(part_smalls)
        merged = merge_smalls(first, values, record.world_size, what)
    result = first.fill(totals, merged)
    for name, policy in policies.items():
        if name in result:
            result[name] = policy.apply_resets(result[name])
    return result


def _sharded_entry(node: Any, path: str = "") -> str | None:
    """The first sharded (DTensor) tensor's path in a split payload, ``None`` if it holds none."""
    if is_record(node):
        return path.lstrip("/")
    if isinstance(node, dict):
        items: Any = node.items()
    elif isinstance(node, (list, tuple)):
        items = enumerate(node)
    else:
        return None
    return next((found for k, v in items if (found := _sharded_entry(v, f"{path}/{k}")) is not None), None)


def _not_sharded_message(what: str, tensor: str, saved_world: int, world: int) -> str:
    return (
        f"{what}: the checkpoint holds sharded (FSDP2 / DTensor) state, each saved rank its own shards ({tensor} among "
        f"them), saved by {saved_world} ranks, but the state loading it here ({world} ranks) is not sharded. Either "
        "fully_shard the model the way it was saved (fully_shard(model, mesh=init_device_mesh(..., mesh_dim_names="
        "(\"replicate\", \"shard\"))[\"shard\"]) before building the optimizer) and load again, which reshards to "
        "any layout and world size; or write one consolidated, unsharded file with "
        "`python -m elastic_hsgd export URL OUT.safetensors` and load that with safetensors.torch.load_file and "
        "model.load_state_dict. The merge= option does not apply: the saved ranks differ because each holds other slices."
    )


def _differing_message(what: str, differing: list[int], detail: str, policies: Mapping[str, MergePolicy]) -> str:
    entry = _entry_of(detail)
    kind = policies.get(entry, EQUAL).kind
    head = (
        f"{what}: cannot merge the saved replicas: entry {entry!r} differs between them "
        f"(saved ranks {differing[:8]} differ from saved rank 0; first difference {detail}). "
    )
    if kind == "equal":
        others = ", ".join(repr(p) for p in ("min", "max", "mean"))
        return head + (
            f"Its merge policy is 'equal' (floating-point tensors averaged, everything else equal in every replica), "
            f"as for any state that must not drift, such as step counters. If per-rank values are expected, say "
            f"how to combine them: CheckpointManager(..., merge={{{entry!r}: 'rank0'}}) (or {others}); "
            "otherwise resume at the saved world size."
        )
    return head + (
        f"Its merge policy {kind!r} combines numbers and tensors, but its structure (keys, lengths, tensor shapes "
        "and dtypes) and its strings must agree in every replica: resume at the saved world size."
    )
