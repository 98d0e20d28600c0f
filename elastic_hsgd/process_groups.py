"""Process groups this package creates, and how to let them go safely.

Why releasing matters: a gloo worker thread drops its reference to a finished
collective (and the tensors it holds) a moment after the caller saw it
complete, and dropping a tensor reference takes the GIL. If the interpreter is
already finalizing at that moment, Python ends the thread from inside a C++
destructor and the process aborts with ``terminate called without an active
exception`` (exit code -6, torchrun rc 1), typically after the job's last step.
Destroying a group and dropping the last reference to it runs gloo's
destructor, which joins its worker threads with the GIL released, so every
group this package creates is released before interpreter exit.
"""

from __future__ import annotations

import atexit
import gc
import logging
import weakref
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)


def release_group(group: dist.ProcessGroup | None) -> None:
    """Destroy ``group`` if it is still registered (never the default group).

    The caller must drop its own references afterwards; the C++ destructor,
    which joins the group's threads, runs when the last one goes.
    """
    if group is None or not dist.is_initialized() or group is dist.group.WORLD:
        return
    try:
        dist.destroy_process_group(group)
    except (ValueError, RuntimeError, AssertionError):
        pass  # already gone with the default group it belonged to


def agree(obj: Any, group: dist.ProcessGroup) -> list[Any]:
    """Every member's ``obj``, gathered over a short-lived gloo group of ``group``'s
    members, joined before returning. Collective over the default group.

    For agreements after which ranks may raise together: the raise usually ends
    the process, so no collective of this one may still be finishing then.
    """
    ranks = dist.get_process_group_ranks(group)
    # Like every new_group, called by all ranks of the default group (a
    # hashed, locally synchronized name would repeat between calls and reuse
    # the previous group's rendezvous keys).
    temporary = dist.new_group(ranks, backend="gloo")
    try:
        out: list[Any] = [None] * len(ranks)
        dist.all_gather_object(out, obj, group=temporary)
        return out
    finally:
        release_group(temporary)


_exit_hooks: list[weakref.WeakMethod] = []
_exit_registered = False


def release_at_exit(method: Any) -> None:
    """Call bound ``method`` (e.g. an averager's group release) at interpreter exit,
    newest first, then destroy the default group if it is still there.

    Registered with :mod:`atexit` once, by the first object that needs it, so
    it runs after handlers registered later (a checkpoint manager's wait for a
    pending save) and before the interpreter finalizes.
    """
    global _exit_registered
    _exit_hooks[:] = [ref for ref in _exit_hooks if ref() is not None]
    _exit_hooks.append(weakref.WeakMethod(method))
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_release_all)


def _release_all() -> None:
    for ref in reversed(_exit_hooks):
        method = ref()
        if method is not None:
            try:
                method()
            except Exception:  # noqa: BLE001 - nothing left to raise to at exit
                logger.exception("releasing process groups at exit failed")
    _exit_hooks.clear()
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        # Objects the script still holds (a DDP model) keep the default group
        # alive; those that are already garbage let its threads be joined now.
        # (An NCCL default group is left to the script: its teardown is torch's.)
        dist.destroy_process_group()
    # Unconditionally, also when the script destroyed the default group itself:
    # groups still held by garbage in reference cycles (a DDP model's reducer,
    # hook states) are freed now, while their threads can still be joined, not
    # by the interpreter's final collection during finalization.
    gc.collect()
