"""How often the local tier may save: a CPU budget, decided the same way on every rank.

A local save costs CPU (staging, writing, the buddy copy, the gathers) that
training would otherwise use; with fast steps (milliseconds) a save every few
steps would take more CPU than training. So the tier keeps a budget, a token
bucket of CPU seconds: it fills at ``FRACTION`` of the wall time (saves get at
most that share of one core on each rank, in the long run), up to ``BURST``,
and every save's cost (the staging copy, plus the CPU time of every thread
but the training one while the save runs: :func:`cpu_outside`; the most any
rank spent) is taken out of it. After
a save the next one is due only once the bucket holds that save's cost again,
rounded up to the tier's cadence (``local_every``): :meth:`Cadence.update`
returns that step. Slow steps (seconds) never wait; fast ones save less often.

Every input comes from one all_gather (rank 0's clock and step time, the most
CPU any rank spent), so every rank computes the same due step: a rank never
starts a save that another skips.

Example::

    >>> cadence = Cadence(every=5)
    >>> cadence.update(step=5, wall_s=0.0, cpu_s=0.0, step_s=0.007)   # nothing spent yet: next due as usual
    10
    >>> cadence.bucket = 0.0                                           # the burst is used up
    >>> cadence.update(step=10, wall_s=0.5, cpu_s=0.002, step_s=0.007)   # a 2 ms save, 500 ms after the last
    15
    >>> cadence.update(step=15, wall_s=0.035, cpu_s=0.02, step_s=0.007)  # a 20 ms save: ~3.7 s until the next
    540
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

#: The share of one core's time a rank's local saves may take in the long run. A save is charged
#: the process's CPU time outside the training thread while it runs (:func:`cpu_outside`): its
#: own thread's and gloo's transfer threads'. Charging the save thread's time alone undercounted:
#: at 0.1 a save every 5 steps of 8 ms steps still cost a quarter of the steps (bench/goodput.py,
#: failure-free). Where ranks outnumber cores, every CPU second of a save is taken from training:
#: at 0.03, 4 ranks on 2 cores trained 6 % fewer steps (bench/goodput.py --task digits); hence 1 %,
#: still a 1-second save every 100 s on every rank.
FRACTION = 0.01
#: CPU seconds of saves allowed at once before the budget throttles (a few saves, at start or after a pause).
BURST = 0.25


def training_clock() -> int | None:
    """The CPU clock of the calling (training) thread, for :func:`cpu_outside`; ``None`` where
    the platform has no per-thread clocks (then a save is charged its own thread's time only)."""
    getter = getattr(time, "pthread_getcpuclockid", None)
    return None if getter is None else getter(threading.get_ident())


def cpu_outside(clock: int | None) -> float:
    """CPU seconds this process spent so far outside the thread of ``clock``; the difference
    over a save is what the save took from training: the save thread, gloo's threads (and
    whatever else ran beside training then, so it errs on the side of saving less)."""
    if clock is None:
        return time.thread_time()
    try:
        return time.process_time() - time.clock_gettime(clock)
    except OSError:  # the training thread is gone (the save runs at exit)
        return time.thread_time()


@dataclass
class Cadence:
    """The local tier's save budget and its next due step (steps below it are skipped without a save)."""

    every: int
    bucket: float = BURST
    next_due: int = 0

    def update(self, step: int, wall_s: float, cpu_s: float, step_s: float | None) -> int:
        """After the gather of ``step``: refill for ``wall_s`` seconds, charge ``cpu_s``, set :attr:`next_due`.

        ``cpu_s`` is the CPU time spent on saves since the previous gather, also
        the estimate of the next save's cost; ``step_s`` the seconds per
        training step (``None``: not known yet, the next due step is the next
        multiple of ``every``).
        """
        self.bucket = min(BURST, self.bucket + FRACTION * max(wall_s, 0.0)) - max(cpu_s, 0.0)
        short = cpu_s - self.bucket  # CPU seconds missing for another save like this one
        steps = 0 if short <= 0 or not step_s or step_s <= 0 else math.ceil(short / FRACTION / step_s)
        self.next_due = step + self.every * max(1, math.ceil(steps / self.every))
        return self.next_due
