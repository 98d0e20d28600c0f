"""The local tier's skipped saves: counted by kind, DEBUG each, an INFO summary now and then and at close.

Kinds: ``"cadence"`` (the CPU budget of :mod:`.local_cadence` is spent),
``"busy"`` (the previous save still ran on some rank) and ``"space"`` (a node
folder would not fit the step; the first is a WARNING).

Example::

    >>> skips = SkipLog(rank=0, url="/dev/shm/ckpt")
    >>> skips.asked(); skips.asked(); skips.skip(10, "busy", "rank 1 still saving")
    >>> skips.total, skips.due
    (1, 2)
"""

from __future__ import annotations

import logging
import time
from collections import Counter

logger = logging.getLogger(__name__.rsplit(".", 1)[0] + ".local")  # the tier's logger: users filter one name

#: Seconds between the INFO summaries of skipped saves (and one at close).
SUMMARY_EVERY_S = 60.0

_WHY = {
    "cadence": "to keep the saves' CPU time under its budget (a save costs more than the steps between saves)",
    "busy": "while the previous one still ran: a save took longer than local_every steps",
    "space": "for lack of space",
}


class SkipLog:
    """How many due local saves were asked for and skipped (by kind), and their log lines."""

    def __init__(self, rank: int, url: str) -> None:
        self.rank, self.url = rank, url
        self.kinds: Counter[str] = Counter()
        self.due = 0
        self._last_summary = time.monotonic()

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def asked(self) -> None:
        """One more due save."""
        self.due += 1

    def skip(self, step: int, kind: str, why: str) -> None:
        """Count a skip of ``step``; DEBUG (the first for space: a WARNING), and a summary if one is due."""
        self.kinds[kind] += 1
        if kind == "space" and self.kinds[kind] == 1 and self.rank == 0:
            logger.warning(
                "local checkpoint of step %d skipped: %s. While a step is written a node folder holds up to local_keep + 1 "
                "steps: free space, raise local_size_limit (and the emptyDir sizeLimit), or lower local_keep. Later "
                "skips for space are logged at DEBUG.", step, why,
            )
            return
        logger.debug("local checkpoint of step %d skipped: %s", step, why)
        if time.monotonic() - self._last_summary > SUMMARY_EVERY_S:
            self.summary()

    def summary(self) -> None:
        """INFO on rank 0: how many of the due saves were skipped, and why."""
        self._last_summary = time.monotonic()
        if self.rank == 0 and self.kinds:
            reasons = "; ".join(f"{n} {_WHY[kind]}" for kind, n in self.kinds.items())
            logger.info("local checkpoint tier at %s: skipped %d of %d due local saves (%s)", self.url, self.total, self.due, reasons)
