"""One background saver: at most one pending save, waited for before the next, closed at exit.

Both tiers write in a background thread so training goes on while bytes
travel. A save starts only after the previous one finished (every rank waits,
so background collectives of one save never interleave with the next's), and
what a failed save means is the tier's call: the cloud tier raises it, the
local tier logs it or stops the worker. So :meth:`BackgroundSaver.wait` hands
the failure to the caller's handler.

Example::

    >>> saver = BackgroundSaver("example-save")
    >>> saver.submit(7, lambda: 1 / 0)   # the save of step 7, in the save thread
    >>> saver.wait(lambda step, exc: print(f"save of step {step} failed: {exc!r}"))
    save of step 7 failed: ZeroDivisionError('division by zero')
    >>> saver.close()
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

logger = logging.getLogger(__name__)

FailureHandler = Callable[[int, Exception], None]


class BackgroundSaver:
    """A single save thread with at most one pending save (its step and future).

    The thread starts with the first :meth:`submit`; :meth:`close` joins it.
    """

    def __init__(self, thread_name_prefix: str) -> None:
        self.thread_name_prefix = thread_name_prefix
        self.executor: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[None]] | None = None

    @property
    def pending_step(self) -> int | None:
        """The step of the save not yet waited for, if any."""
        return None if self._pending is None else self._pending[0]

    def submit(self, step: int, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` in the save thread as the save of ``step``; :meth:`wait` first."""
        if self._pending is not None:
            raise RuntimeError(f"the save of step {self._pending[0]} is still pending: wait for it first.")
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name_prefix)
        self._pending = (step, self.executor.submit(fn, *args))

    def wait(self, on_failure: FailureHandler) -> None:
        """Block until the pending save finished; if it raised, call ``on_failure(step, exc)``.

        The save is no longer pending afterwards, failed or not. The handler
        runs inside the ``except`` block, so what it raises chains to ``exc``.
        """
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - the handler decides
            on_failure(step, exc)

    def close(self) -> None:
        """Join the save thread (a pending save finishes first). Idempotent."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


class Closeable(Protocol):
    """Anything with a ``close()`` (a checkpoint manager, a tier)."""

    def close(self) -> None:
        """Finish pending work and release resources."""


def close_at_exit(obj: Closeable) -> None:
    """Call ``obj.close()`` at interpreter exit unless ``obj`` is gone by then; a failure is logged.

    ``obj`` is held weakly: registering does not keep it alive.
    """
    atexit.register(_close_at_exit, weakref.ref(obj))


def _close_at_exit(ref: "weakref.ref[Closeable]") -> None:
    obj = ref()
    if obj is None:
        return
    try:
        obj.close()
    except Exception:  # noqa: BLE001 - nothing left to raise to at exit
        logger.exception("a pending checkpoint save failed at exit")
