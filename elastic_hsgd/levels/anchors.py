"""What an anchored level holds, and the one state every anchored level of an averager shares."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..outer import OuterOptimizerFactory


@dataclass
class AnchoredLevel:
    """A level that keeps an anchor: one flat anchor per parameter buffer, and its outer optimizer."""

    period: int
    make_optimizer: OuterOptimizerFactory | None
    comm_dtype: torch.dtype | None
    anchors: list[torch.Tensor] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None

    def set_anchors(self, values: Iterable[torch.Tensor]) -> None:
        """Each anchor := the matching value (a flat buffer, a mean, a saved anchor)."""
        for anchor, value in zip(self.anchors, values):
            anchor.copy_(value)


class Agreement(enum.Enum):
    """Whether the ranks of each anchored level's group hold the same anchors."""

    #: No anchors yet: they start at the next call at or after warmup (below an
    #: anchored ``"replicas"`` level: at its first committed sync after warmup).
    NOT_STARTED = "not started"
    #: Started, and every rank of each level's group holds the same anchors.
    AGREED = "agreed"
    #: Started, but the membership changed since (a rebuild, or a checkpoint from
    #: another world size): anchors and outer state are averaged over the new
    #: world at the next call.
    STALE = "stale"


@dataclass
class AnchorState:
    """Where the anchors of every anchored level stand: they start, load and re-agree together.

    ``NOT_STARTED -> AGREED`` when the anchors start (a mean over the whole
    group, or the first committed top-level sync after warmup); ``AGREED ->
    STALE`` at a rebuild, and back once re-agreed. A loaded checkpoint sets the
    saved state (``STALE`` if saved at another world size), ``pending`` until
    the anchors exist.

    Example::

        >>> state = AnchorState()
        >>> state.started, state.agreement.value
        (False, 'not started')
    """

    agreement: Agreement = Agreement.NOT_STARTED
    #: Outer state loaded (``agreement`` started) before the anchors were allocated:
    #: applied at the next sync, once the parameters' flat buffers are known.
    pending: dict[str, Any] | None = None

    @property
    def started(self) -> bool:
        """Whether the anchors started (agreed or stale)."""
        return self.agreement is not Agreement.NOT_STARTED
