"""Checkpoint tiers: where a step's files live, each behind the same small interface.

A tier saves a step, lists the steps it holds, and offers one of them for
loading (:class:`StepReader`). The :class:`~..manager.CheckpointManager` asks
each tier in turn and never needs to know which one it is talking to:

- :class:`~.cloud.CloudTier`: the durable tier, any fsspec URL, written every
  ``every`` steps;
- :class:`~.local.LocalTier`: node-local folders plus a buddy copy of every
  rank on another node, written every few steps.

Example::

    >>> # xdoctest: +SKIP("the manager builds its tiers")
    >>> for tier in manager.tiers:
    ...     print(tier.name, sorted(tier.held_steps()))
    cloud [100, 200]
    local [195, 200]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..layout import CommitRecord


@dataclass(frozen=True)
class StepReader:
    """What a tier offers of one step: its commit record and every saved rank's payload.

    ``fetch(saved_rank)`` returns the decoded, verified payload of that saved
    rank's file, or raises :class:`~..commit.Unusable`. ``source`` is where it
    comes from (``"cloud"``, ``"local"`` or ``"buddy"``, the manager's
    ``last_source``) and ``url`` the tier's location, for messages.
    """

    record: CommitRecord
    fetch: Callable[[int], dict[str, Any]]
    source: str
    url: str


class Tier(Protocol):
    """The interface every tier has. All methods but :meth:`save` are collective over the world."""

    name: str  # "cloud" or "local", in logs
    url: str

    def save(self, step: int, payload: dict[str, Any], entries: dict[str, Any] | None, extra: dict[str, Any] | None) -> None:
        """Save the captured ``payload`` as step ``step`` (collective, perhaps finished in the background)."""

    def held_steps(self) -> set[int]:
        """The committed steps this tier may provide, the same on every rank (collective)."""

    def reader(self, step: int) -> StepReader | None:
        """Step ``step`` of :meth:`held_steps` for loading, or ``None`` if this tier cannot give every rank its part."""

    def warn_unusable(self, step: int, error: Exception) -> None:
        """Log, in this tier's words, that loading ``step`` from it failed verification."""

    def loaded(self, step: int) -> None:
        """The run continues from ``step`` (from any tier): later saves supersede steps past it."""

    def resumed(self, step: int | None) -> None:
        """:meth:`~..manager.CheckpointManager.load_latest` chose ``step`` (``None``: a fresh start)."""

    def wait(self) -> None:
        """Block until this tier's pending background save finished."""

    def close(self) -> None:
        """Wait, then release this tier's threads and groups. Idempotent."""
