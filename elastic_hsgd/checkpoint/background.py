"""One background saver: pending saves run in order in one thread, waited for before the next, closed at exit.

Both tiers write in a background thread so training goes on while bytes
travel. The cloud tier keeps at most one save pending (every rank waits for it
before the next, so background collectives of one save never interleave with
the next's); the local tier queues its saves (:meth:`BackgroundSaver.submit`
with ``queue=True``) and never waits at a due step: the thread runs them one
after the other, in the same order on every rank. What a failed save means is
the tier's call: the cloud tier raises it, the local tier logs it or stops the
worker. So :meth:`BackgroundSaver.wait` hands the failure to the caller's handler.

**At exit.** :func:`close_at_exit` closes a manager when the interpreter exits.
If that close raises (a pending save failed, and the script ended without
``close()``), the failure is logged naming the step and the process exits with
code 1 once every exit handler of the package has run, so that a launcher
(torchrun) does not report success while the last checkpoint is missing.

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
import os
import sys
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

logger = logging.getLogger(__name__)

FailureHandler = Callable[[int, Exception], None]


class BackgroundSaver:
    """A single save thread and its pending saves (each a step and a future), oldest first.

    The thread starts with the first :meth:`submit`; :meth:`close` joins it.
    """

    def __init__(self, thread_name_prefix: str) -> None:
        self.thread_name_prefix = thread_name_prefix
        self.executor: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[int, Future[None]]] = deque()

    @property
    def pending_step(self) -> int | None:
        """The step of the oldest save not yet waited for, if any."""
        return self._pending[0][0] if self._pending else None

    def submit(self, step: int, fn: Callable[..., None], *args: Any, queue: bool = False) -> None:
        """Run ``fn(*args)`` in the save thread as the save of ``step``.

        Without ``queue``, :meth:`wait` first: a save is pending already raises.
        With it, ``fn`` runs after the saves pending before it.
        """
        if self._pending and not queue:
            raise RuntimeError(f"the save of step {self._pending[0][0]} is still pending: wait for it first.")
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name_prefix)
        self._pending.append((step, self.executor.submit(fn, *args)))

    def wait(self, on_failure: FailureHandler) -> None:
        """Block until every pending save finished; for each that raised, call ``on_failure(step, exc)``.

        In submission order. The saves are no longer pending afterwards, failed
        or not (also the ones after a handler that raised, which are waited for
        first). The handler runs inside the ``except`` block, so what it raises
        chains to ``exc``.
        """
        raised: BaseException | None = None
        while self._pending:
            try:
                self._finish(on_failure)
            except BaseException as exc:  # noqa: BLE001 - the first is re-raised once every save finished
                raised = raised or exc
        if raised is not None:
            raise raised

    def poll(self, on_failure: FailureHandler) -> None:
        """Without blocking: hand over the saves already finished (oldest first), as :meth:`wait` does."""
        while self._pending and self._pending[0][1].done():
            self._finish(on_failure)

    def _finish(self, on_failure: FailureHandler) -> None:
        step, future = self._pending.popleft()
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - the handler decides
            on_failure(step, exc)

    def close(self) -> None:
        """Join the save thread (pending saves finish first). Idempotent."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


class Closeable(Protocol):
    """Anything with a ``close()`` (a checkpoint manager, a tier)."""

    def close(self) -> None:
        """Finish pending work and release resources."""


def close_at_exit(obj: Closeable) -> None:
    """Call ``obj.close()`` at interpreter exit unless ``obj`` is gone by then.

    ``obj`` is held weakly: registering does not keep it alive. A failure is
    logged, and the process then exits with code 1 (see the module docstring).
    """
    atexit.register(_close_at_exit, weakref.ref(obj))


_failed_at_exit: list[str] = []


def _close_at_exit(ref: "weakref.ref[Closeable]") -> None:
    obj = ref()
    if obj is None:
        return
    try:
        obj.close()
    except Exception as exc:  # noqa: BLE001 - nothing left to raise to at exit
        _failed_at_exit.append(str(exc))
        logger.error(
            "checkpoint not saved: %s. The script ended without close() while this save was pending; "
            "the process exits with code 1 so that the launcher does not report success.",
            exc,
        )


def _exit_non_zero_if_a_save_failed() -> None:
    """Registered when this module is imported, before any manager exists: it runs after
    every manager's close and every group's release (atexit runs newest first)."""
    if not _failed_at_exit:
        return
    logging.shutdown()  # flushes the handlers; what os._exit skips would not
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream
            pass
    os._exit(1)


atexit.register(_exit_non_zero_if_a_save_failed)
