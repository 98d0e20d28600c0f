"""Turning a training state into bytes and back, without ever unpickling code.

Writing uses ``torch.save``; reading uses ``torch.load(weights_only=True)``,
whose restricted unpickler accepts tensors and plain containers and refuses
anything that would import or call code.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

RNG_KEY = "__rng__"


def _has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def copy_to_cpu(value: Any) -> Any:
    """A deep copy whose tensors live in host memory (staging for async saves)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: copy_to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(copy_to_cpu(v) for v in value)
    return value


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def capture(state: Mapping[str, Any], *, include_rng: bool = True, stage: bool = False) -> dict[str, Any]:
    """What a rank saves: each entry's ``state_dict()`` or plain value, and RNG.

    ``stage=True`` copies every tensor to host memory so training can go on
    changing the originals while the copy is written.
    """
    if RNG_KEY in state:
        raise ValueError(f"state key {RNG_KEY!r} is reserved for the RNG state; rename that entry.")
    payload: dict[str, Any] = {}
    for name, obj in state.items():
        payload[name] = obj.state_dict() if _has_state_dict(obj) else obj
    if include_rng:
        payload[RNG_KEY] = rng_state()
    return copy_to_cpu(payload) if stage else payload


def serialize(payload: Mapping[str, Any]) -> memoryview:
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    return buffer.getbuffer()


def deserialize(data: bytes) -> dict[str, Any]:
    """Load bytes written by :func:`serialize`; refuses pickled code (raises)."""
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint payload is a {type(payload).__name__}, not a dict.")
    return payload


def restore(state: MutableMapping[str, Any], payload: Mapping[str, Any], *, restore_rng: bool) -> None:
    """Load ``payload`` into ``state``: ``load_state_dict`` where the entry has one,
    otherwise the saved plain value replaces the entry in the mapping."""
    missing = [name for name in state if name not in payload]
    if missing:
        raise KeyError(f"checkpoint has no entry for {missing}; it holds {sorted(k for k in payload if k != RNG_KEY)}.")
    for name in list(state):
        obj = state[name]
        if _has_state_dict(obj):
            obj.load_state_dict(payload[name])
        else:
            state[name] = payload[name]
    if restore_rng and RNG_KEY in payload:
        set_rng_state(payload[RNG_KEY])
