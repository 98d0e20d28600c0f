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
    True
    >>> saver.close()   # joins the save thread
    True
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Protocol

logger = logging.getLogger(__name__)

FailureHandler = Callable[[int, Exception], None]


class BackgroundSaver:
    """A single save thread and its pending saves (each a step and a future), oldest first.

    The thread starts with the first :meth:`submit`; :meth:`close` joins it.

    At exit it must neither hold the process nor outlive the interpreter.
    It is a daemon thread, so a save stuck in a collective whose peer is gone
    does not hold a worker whose training failed (Python joins every
    non-daemon thread before any exit handler runs, and the tier's
    ``close()``, an exit handler, is what decides whether to wait). But it is
    not left running into finalization either: when the main thread ends, it
    is told to stop after its queued saves and joined, unless an uncaught
    exception ended the script with a save still running
    (:func:`_stop_at_shutdown`; tests/test_clean_exit.py, whose worker ends
    with a save pending and its manager collected, aborted without it).
    """

    def __init__(self, thread_name_prefix: str) -> None:
        self.thread_name_prefix = thread_name_prefix
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[Future[None], Callable[..., None], tuple] | None] = queue.SimpleQueue()
        self._pending: deque[tuple[int, Future[None]]] = deque()
        self._stopping = threading.Event()  # set once the thread was told to stop at shutdown

    @property
    def executor(self) -> threading.Thread | None:
        """The save thread; ``None`` before the first save and once closed."""
        return self._thread

    @property
    def pending_step(self) -> int | None:
        """The step of the oldest save not yet waited for, if any."""
        return self._pending[0][0] if self._pending else None

    @property
    def busy(self) -> bool:
        """Whether a save submitted here has not finished yet (waited for or not)."""
        return any(not future.done() for _, future in self._pending)

    def submit(self, step: int, fn: Callable[..., None], *args: Any, queue: bool = False) -> None:
        """Run ``fn(*args)`` in the save thread as the save of ``step``.

        Without ``queue``, :meth:`wait` first: a save is pending already raises.
        With it, ``fn`` runs after the saves pending before it.
        """
        if self._pending and not queue:
            raise RuntimeError(f"the save of step {self._pending[0][0]} is still pending: wait for it first.")
        if self._thread is None or self._stopping.is_set():  # (a save submitted at exit gets a thread of its own)
            self._jobs, self._stopping = type(self._jobs)(), threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._jobs,), name=f"{self.thread_name_prefix}_0", daemon=True)
            self._thread.start()
            _at_threading_shutdown(_stop_at_shutdown, self._thread, self._jobs, self._pending, self._stopping)
        future: Future[None] = Future()
        self._jobs.put((future, fn, args))
        self._pending.append((step, future))

    @staticmethod
    def _run(jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                future.set_exception(exc)
            else:
                future.set_result(None)
            # An idle thread must not keep the last save's tensors or its tier (and group) alive.
            del job, future, fn, args

    def wait(self, on_failure: FailureHandler, timeout: float | None = None) -> bool:
        """Block until every pending save finished; for each that raised, call ``on_failure(step, exc)``.

        In submission order. The saves are no longer pending afterwards, failed
        or not (also the ones after a handler that raised, which are waited for
        first). The handler runs inside the ``except`` block, so what it raises
        chains to ``exc``. With ``timeout`` (seconds), returns ``False`` once it
        passed with a save still running (those left stay pending), else ``True``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        raised: BaseException | None = None
        while self._pending:
            if deadline is not None and not wait_futures([self._pending[0][1]], max(0.0, deadline - time.monotonic())).done:
                break
            try:
                self._finish(on_failure)
            except BaseException as exc:  # noqa: BLE001 - the first is re-raised once every save finished
                raised = raised or exc
        if raised is not None:
            raise raised
        return not self._pending

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

    def close(self, timeout: float | None = None) -> bool:
        """Join the save thread (pending saves finish first). Idempotent.

        With ``timeout``, gives up on a thread still running after it (it is a
        daemon: it ends with the process) and returns ``False``.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._jobs.put(None)
        thread.join(timeout)
        return not thread.is_alive()


def _at_threading_shutdown(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` when the main thread ends, before Python joins non-daemon
    threads and before :mod:`atexit` handlers (``threading._register_atexit``,
    which ``concurrent.futures`` uses; without it, only the exit handlers run)."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        return
    try:
        register(fn, *args)
    except RuntimeError:
        pass  # the interpreter is shutting down already; the exit handlers still close


def _stop_at_shutdown(thread: threading.Thread, jobs: queue.SimpleQueue, pending: deque, stopping: threading.Event) -> None:
    """Tell a save thread to stop once its queued saves ran, and join it, as
    ``ThreadPoolExecutor`` does for its workers: a script that ends without
    ``close()``, its manager already collected, still commits its last save,
    and no thread of ours is inside a collective when the interpreter
    finalizes. Not after an uncaught exception with a save still running
    (likely a collective whose peer is gone): the tier's ``close()`` decides."""
    if not thread.is_alive():
        return
    stopping.set()
    jobs.put(None)
    failing = getattr(sys, "last_value", None) is not None
    if failing and any(not future.done() for _, future in pending):
        return
    thread.join()


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
