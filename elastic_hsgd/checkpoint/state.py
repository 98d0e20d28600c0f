"""Turning a training state into bytes and back, without ever unpickling.

The bytes are :mod:`.format`'s (safetensors with the tree as JSON), so a
checkpoint can hold data only, never code. Files of version 0.1 (``.ehsgd``,
:mod:`.tensorfile`) are still read.

:func:`restore` leaves the objects the training loop holds in place: objects
with ``load_state_dict`` load into themselves, modules under their own key
names (:mod:`.names`: compiled or DDP-wrapped or not), and plain dicts, lists
and tensors are updated in place (:func:`update_in_place`). Decoded tensors
view the buffer the file was read into, so whatever a loaded object keeps
(an optimizer keeps the tensors it is handed) is copied first: the buffer
is freed once the load returns.

Example::

    >>> import torch
    >>> held = {"epoch": 0, "seen": torch.zeros(2)}
    >>> seen = held["seen"]
    >>> state = {"data": held}
    >>> restore(state, {"data": {"epoch": 3, "seen": torch.ones(2)}}, restore_rng=False)
    >>> state["data"] is held, held["epoch"], held["seen"] is seen, seen.tolist()
    (True, 3, True, [1.0, 1.0])
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from . import format as fileformat
from . import tensorfile
from .names import for_module, plain_state_dict
from .dtensor_state import Fill, into_live, to_records

logger = logging.getLogger(__name__)

RNG_KEY = "__rng__"


def _has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def copy_to_cpu(value: Any, pool: dict[tuple, torch.Tensor] | None = None, path: tuple = ()) -> Any:
    """A deep copy whose tensors live in host memory (staging for async saves).

    With ``pool``, host buffers are reused from one save to the next (keyed by
    their place in the tree): no fresh allocation and page faults per save.
    """
    if isinstance(value, torch.Tensor):
        source = value.detach()
        buffer = pool.get(path) if pool is not None else None
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda)
            if pool is not None:
                pool[path] = buffer
        buffer.copy_(source, non_blocking=source.is_cuda)
        return buffer
    if isinstance(value, dict):
        return {k: copy_to_cpu(v, pool, (*path, k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [copy_to_cpu(v, pool, (*path, i)) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return value


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, Python, CUDA if in use, NumPy if installed), as tensors and plain values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def capture(
    state: Mapping[str, Any], *, include_rng: bool = True, stage: bool = False, pool: dict[tuple, torch.Tensor] | None = None
) -> dict[str, Any]:
    """What a rank saves: each entry's ``state_dict()`` or plain value, and RNG.

    ``stage=True`` copies every tensor to host memory (reusing ``pool``'s
    buffers) so training can go on changing the originals while the copy is written.
    """
    if RNG_KEY in state:
        raise ValueError(f"state key {RNG_KEY!r} is reserved for the RNG state; rename that entry.")
    payload: dict[str, Any] = {}
    for name, obj in state.items():
        value = obj.state_dict() if _has_state_dict(obj) else obj
        if isinstance(obj, torch.nn.Module):  # plain names: loads compiled, DDP-wrapped or not (.names)
            value = plain_state_dict(value)
        payload[name] = to_records(value)  # DTensors: local shard + layout
    if include_rng:
        payload[RNG_KEY] = rng_state()
    if not stage:
        return payload
    staged = copy_to_cpu(payload, pool)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the non_blocking copies above must land before writing
    return staged


def serialize(payload: Mapping[str, Any]) -> list[bytes | memoryview]:
    """The file's bytes as chunks; CPU tensors are handed over without a copy."""
    return fileformat.encode(dict(payload))


def deserialize(data: bytearray | memoryview) -> dict[str, Any]:
    """Decode bytes written by :func:`serialize` (or by 0.1); anything else raises ``ValueError``.

    Tensors are views of ``data``: no second copy.
    """
    if bytes(memoryview(data)[: len(tensorfile.MAGIC)]) == tensorfile.MAGIC:
        payload = tensorfile.decode(bytes(data))
    else:
        payload = fileformat.decode(data)
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint payload is a {type(payload).__name__}, not a dict.")
    return payload


def owned(value: Any) -> Any:
    """``value`` with every tensor copied into memory of its own (dicts, lists and tuples rebuilt)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: owned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [owned(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def update_in_place(target: Any, loaded: Any) -> Any:
    """``loaded``, written into ``target`` where the two agree; returns what the entry holds afterwards.

    A dict keeps its identity and ends with exactly ``loaded``'s keys, each
    value updated in turn; a list of the same length is updated item by item
    (another length: its items are replaced); a tensor of the same shape and
    dtype takes the values (``copy_``, also onto another device). Anything
    else, and a tuple (immutable), is replaced by (a copy of) ``loaded``.
    """
    if isinstance(target, torch.Tensor) and isinstance(loaded, torch.Tensor):
        if target.shape == loaded.shape and target.dtype == loaded.dtype:
            with torch.no_grad():
                target.copy_(loaded)
            return target
        return loaded.clone()
    if isinstance(target, dict) and isinstance(loaded, dict):
        for key in [k for k in target if k not in loaded]:
            del target[key]
        for key, value in loaded.items():
            target[key] = update_in_place(target[key], value) if key in target else owned(value)
        if list(target) != list(loaded):  # the saved order
            for key in loaded:
                target[key] = target.pop(key)
        return target
    if isinstance(target, list) and isinstance(loaded, list):
        if len(target) == len(loaded):
            for index, value in enumerate(loaded):
                target[index] = update_in_place(target[index], value)
        else:
            target[:] = owned(loaded)
        return target
    if isinstance(target, tuple) and isinstance(loaded, tuple) and len(target) == len(loaded):
        items = tuple(update_in_place(t, v) for t, v in zip(target, loaded))
        return target if all(a is b for a, b in zip(items, target)) else items
    return owned(loaded)


def restore(
    state: MutableMapping[str, Any],
    payload: Mapping[str, Any],
    *,
    restore_rng: bool,
    strict: bool = True,
    views: bool = True,
    fill: Fill | None = None,
) -> None:
    """Load ``payload`` into ``state``: ``load_state_dict`` where the entry has one
    (a module's under its own key names), otherwise :func:`update_in_place`.

    Both directions are checked before anything is loaded: an entry of ``state``
    the checkpoint lacks is an error, and so (unless ``strict=False``) is an
    entry the checkpoint holds that ``state`` lacks, since silently dropping,
    e.g., the averager would restart its step and repeat warmup.

    ``views``: the payload's tensors may view a read buffer (a decoded file),
    so what an object may keep is copied first (modules copy into their own
    tensors). ``False`` when the caller built them (the mean of replicas).

    Sharded entries load into the live DTensors' local tensors (:mod:`.dtensor_state`):
    by default each rank's own saved shard, else what ``fill`` writes (a reshard).
    """
    saved = sorted(k for k in payload if k != RNG_KEY)
    missing = [name for name in state if name not in payload]
    if missing:
        raise KeyError(f"checkpoint has no entry for {missing}; it holds {saved}.")
    left_out = [name for name in saved if name not in state]
    if left_out and strict:
        raise KeyError(
            f"checkpoint holds {left_out} but `state` has no such entries (it has {sorted(state)}), so they would "
            "be silently dropped: add them to `state` (e.g. build the averager before loading), or pass "
            "strict=False to load only the entries `state` has."
        )
    keep = owned if views else (lambda value: value)
    for name in list(state):
        obj, value = state[name], payload[name]
        if isinstance(obj, torch.nn.Module) and isinstance(value, Mapping):
            value = for_module(obj, value)
        value = into_live(obj, value, name, fill)  # DTensors: written into the live local shards
        if not _has_state_dict(obj):
            state[name] = update_in_place(obj, value)
        elif isinstance(obj, torch.nn.Module) and isinstance(value, Mapping):
            obj.load_state_dict(value)  # under its own names (above); copied into its own tensors
        else:
            obj.load_state_dict(keep(value))
    if restore_rng and RNG_KEY in payload:
        set_rng_state(payload[RNG_KEY])
