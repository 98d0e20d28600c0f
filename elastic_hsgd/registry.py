"""Objects in this process that keep the training step (the averager registers itself here).

The checkpoint manager asks this module, not the averager, whether a state entry holds the step
and whether one is alive in the process: ``checkpoint/`` does not import the averager.
"""

from __future__ import annotations

import weakref
from typing import Any

_step_keepers: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register_step_keeper(obj: Any) -> None:
    """Record ``obj`` (e.g. a :class:`~elastic_hsgd.HierarchicalModelAverager`) as holding the step."""
    _step_keepers.add(obj)


def is_step_keeper(obj: Any) -> bool:
    """Whether ``obj`` registered itself as holding the training step."""
    try:
        return obj in _step_keepers
    except TypeError:  # unhashable state entries (plain dicts, lists) hold no step
        return False


def step_keepers() -> list[Any]:
    """The step keepers alive in this process."""
    return list(_step_keepers)
