"""Model keys without wrapper prefixes, so compiled, DDP-wrapped and plain models share checkpoints.

``torch.compile`` returns a module whose ``state_dict`` keys read
``_orig_mod.<name>`` (also in the middle of a key, for a compiled submodule),
and a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper's read
``module.<name>``. A checkpoint holds a module's state under :func:`plain_names`,
and a load maps them back to the names the target module uses
(:func:`for_module`), so either kind loads into the other. ``export`` writes
the same plain names.

Example::

    >>> import torch
    >>> compiled = torch.compile(torch.nn.Linear(2, 1))   # lazy: nothing is compiled here
    >>> sorted(plain_state_dict(compiled.state_dict()))
    ['bias', 'weight']
    >>> sorted(for_module(compiled, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}))
    ['_orig_mod.bias', '_orig_mod.weight']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .storage import CheckpointError


def plain_names(keys: list[str]) -> dict[str, str]:
    """Each saved key under the name an unwrapped model uses: no ``_orig_mod.``, no DDP ``module.`` prefix.

    ``_orig_mod`` is removed wherever it occurs; ``module.`` when every key starts with it.

    >>> plain_names(["module._orig_mod.fc.weight", "module.layers.0._orig_mod.w"])
    {'module._orig_mod.fc.weight': 'fc.weight', 'module.layers.0._orig_mod.w': 'layers.0.w'}
    """
    names = {key: ".".join(part for part in key.split(".") if part != "_orig_mod") for key in keys}
    while names and all(n.startswith("module.") for n in names.values()):
        names = {key: n.removeprefix("module.") for key, n in names.items()}
    seen: dict[str, str] = {}
    for key, name in names.items():
        if name in seen:
            raise CheckpointError(f"saved keys {seen[name]!r} and {key!r} both become {name!r} without wrapper prefixes")
        seen[name] = key
    return names


def _string_keys(state: Any) -> bool:
    return isinstance(state, Mapping) and all(isinstance(k, str) for k in state)


def plain_state_dict(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A module's ``state_dict`` under :func:`plain_names` (unchanged if its keys are not all strings)."""
    if not _string_keys(state):
        return state
    names = plain_names(list(state))
    return {names[key]: value for key, value in state.items()}


def for_module(module: torch.nn.Module, saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """``saved`` (plain or prefixed keys) under the keys ``module.state_dict()`` uses.

    A saved key the module lacks keeps its plain name, so ``load_state_dict``
    names it as unexpected.
    """
    if not _string_keys(saved):
        return saved
    target = {plain: key for key, plain in plain_names(list(module.state_dict())).items()}
    names = plain_names(list(saved))
    return {target.get(names[key], names[key]): value for key, value in saved.items()}
