"""An overlapped (delayed) sync of an anchored level: ``sync_delays={period: tau}``.

When a level with delay ``tau`` fires at step ``s``, each rank snapshots its
parameters ``theta_s`` and reduces ``delta = anchor - theta_s`` over the
level's group in a background thread, on a group of its own (in the level's
wire dtype, through :class:`~.wire.WireMean`), while training goes on. At the
call of step ``s + tau`` (or earlier, when another level fires first) the
averager waits for the mean, steps the anchor with it and applies
``params += anchor - theta_s`` (:func:`elastic_hsgd.outer.delayed_correction`),
which keeps the local steps taken meanwhile.

The ``"replicas"`` top level (torchft) reduces synchronously at ``s + tau``
instead: torchft's Manager is driven from the training thread, so only the
snapshot is taken at ``s``; the result equals the reference semantics.

Saved state (the ``"in_flight"`` entry of the ``"outer"`` state, plain values and tensors)::

    {"period": int, "completes_at": int,
     "snapshot": [flat tensor per parameter buffer, ...],
     "mean_delta": [flat tensor per parameter buffer, ...]}   # absent while not reduced (replicas)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..hierarchy import Level, contiguous_blocks
from .anchors import AnchoredLevel
from .plain import PlainLevel
from .wire import WireMean

logger = logging.getLogger(__name__)


@dataclass
class InFlightSync:
    """One level's sync between its start (the snapshot, the reduction begun) and its completion.

    ``mean_delta`` are the averager's shared pseudo-gradient buffers: no other
    level fires while a sync is in flight (it completes first), so they are
    free meanwhile. ``reduced``: they hold the mean (set by the background
    thread; a restored sync is reduced; a ``"replicas"`` one reduces at completion).

    Example::

        >>> # xdoctest: +SKIP("needs torch.distributed")
        >>> flight = InFlightSync.start(level, buffers, snapshot, deltas, completes_at=66,
        ...                             group=dedicated, plain=plain, wire=wire)
        >>> ...                       # training goes on
        >>> flight.wait()             # deltas hold the mean of anchor - snapshot over the group
    """

    period: int
    completes_at: int
    snapshot: list[torch.Tensor]
    mean_delta: list[torch.Tensor]
    buffers: list[torch.Tensor]
    reduced: bool = False
    _thread: threading.Thread | None = field(default=None, repr=False)
    _error: BaseException | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        lv: AnchoredLevel,
        buffers: list[torch.Tensor],
        snapshot: list[torch.Tensor],
        deltas: list[torch.Tensor],
        completes_at: int,
        group: dist.ProcessGroup | None,
        plain: PlainLevel,
        wire: WireMean,
    ) -> "InFlightSync":
        """``snapshot := buffers`` now; the mean of ``anchor - snapshot`` over ``group`` in a background
        thread (``group`` ``None``: no reduction now, the ``"replicas"`` level reduces at completion)."""
        with torch.no_grad():
            for snap, flat in zip(snapshot, buffers):
                snap.copy_(flat)
        flight = cls(lv.period, completes_at, snapshot, deltas, list(buffers))
        if group is not None:
            if any(b.device.type == "cuda" for b in buffers):
                torch.cuda.synchronize()  # the snapshot's copies, before another thread reads it
            flight._thread = threading.Thread(
                target=flight._reduce, args=(lv, group, plain, wire), name=f"elastic_hsgd-sync-{lv.period}", daemon=True
            )
            flight._thread.start()
        return flight

    def _reduce(self, lv: AnchoredLevel, group: dist.ProcessGroup, plain: PlainLevel, wire: WireMean) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                for anchor, snap, delta in zip(lv.anchors, self.snapshot, self.mean_delta):
                    if lv.comm_dtype is None:
                        delta.copy_(anchor)
                        delta.sub_(snap)
                        plain.mean_in_place([delta], group)
                        continue

                    def pseudo_gradient(start: int, end: int, a=anchor, s=snap, d=delta) -> None:
                        d[start:end].copy_(a[start:end])
                        d[start:end].sub_(s[start:end])

                    wire.mean(delta, lv.comm_dtype, group, pseudo_gradient)
            self.reduced = True
        except BaseException as exc:  # noqa: BLE001 - raised in the training thread at wait()
            self._error = exc

    @property
    def running(self) -> bool:
        """Whether the background reduction is still going."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Wait for the background reduction; raise in this thread if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(
                f"the overlapped sync of period {self.period} (due at step {self.completes_at}) failed in its "
                f"background reduction: {type(error).__name__}: {error}"
            ) from error

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to finish it (waits for the reduction): live references, as torch's state."""
        self.wait()
        state: dict[str, Any] = {"period": self.period, "completes_at": self.completes_at, "snapshot": list(self.snapshot)}
        if self.reduced:
            state["mean_delta"] = list(self.mean_delta)
        return state


def restore(
    saved: Mapping[str, Any],
    levels: Sequence[AnchoredLevel],
    buffers: list[torch.Tensor],
    snapshot: list[torch.Tensor],
    deltas: list[torch.Tensor],
) -> InFlightSync:
    """A saved in-flight sync, checked and copied into ``snapshot`` and ``deltas`` (the averager's
    pseudo-gradient buffers, of the parameters' layout); ``buffers``: the flat parameters it finishes on."""
    period, completes_at = saved.get("period"), saved.get("completes_at")
    if period not in [lv.period for lv in levels] or isinstance(completes_at, bool) or not isinstance(completes_at, int):
        raise ValueError(
            f"checkpoint's in-flight sync (period {period!r}, completes at {completes_at!r}) is not one of this "
            f"averager's anchored levels {[lv.period for lv in levels]}: configure sync_delays, outer_optimizers "
            "and comm_dtypes as when the checkpoint was saved."
        )
    expected = [(d.numel(), d.dtype) for d in deltas]
    tensors = {"snapshot": saved.get("snapshot"), "mean_delta": saved.get("mean_delta", [])}
    for name, values in tensors.items():
        got = [(t.numel(), t.dtype) if isinstance(t, torch.Tensor) and t.dim() == 1 else None for t in values or []]
        if got != expected and not (name == "mean_delta" and not got):
            raise ValueError(
                f"checkpoint's in-flight sync of period {period} has {name} (elements, dtype) {got} but the "
                f"parameters being averaged have {expected}: resume with the same model and parameter set."
            )
    with torch.no_grad():
        for snap, value in zip(snapshot, tensors["snapshot"]):
            snap.copy_(value)
        for delta, value in zip(deltas, tensors["mean_delta"]):
            delta.copy_(value)
    return InFlightSync(int(period), completes_at, snapshot, deltas, list(buffers), reduced=bool(tensors["mean_delta"]))


# -- the anchored levels' side (``anchors``: the averager's AnchoredLevels) -------------


def snapshot_buffers(anchors: Any, period: Any) -> list[torch.Tensor]:
    """The snapshot buffers of a delayed level (beside the parameters), made at its first sync."""
    if period not in anchors.snapshots:
        anchors.snapshots[period] = [torch.empty_like(d) for d in anchors.deltas]
    return anchors.snapshots[period]


def start(
    anchors: Any, lv: AnchoredLevel, params: list[torch.Tensor], group: dist.ProcessGroup | None, completes_at: int
) -> None:
    """Level ``lv`` fires with a delay: snapshot, and the reduction over ``group`` started in the background
    (``None``: at completion, the ``"replicas"`` level). Lower anchors are reset when it completes."""
    assert anchors.in_flight is None, "a sync is already in flight"
    buffers = anchors.flat_buffers(params)
    anchors._check_layout(buffers)
    anchors.in_flight = InFlightSync.start(
        lv, buffers, snapshot_buffers(anchors, lv.period), anchors.deltas, completes_at, group, anchors._plain, anchors.wire
    )


def finish(anchors: Any, params: list[torch.Tensor] | None = None) -> None:
    """Complete the sync in flight: wait for the mean, step the anchor, ``params += anchor - snapshot``,
    and set the lower levels' anchors to the new anchor (``params`` ``None``: the buffers it started from)."""
    flight, anchors.in_flight = anchors.in_flight, None
    assert flight is not None
    flight.wait()
    lv = anchors.level(flight.period)
    buffers = anchors.flat_buffers(params) if params is not None else flight.buffers
    anchors._check_layout(buffers)
    with torch.no_grad():
        anchors.step_anchors(lv, list(zip(lv.anchors, anchors.deltas, buffers, anchors.host_grads)), flight.snapshot)
    # Lower anchors take the point the whole group just agreed on, the new anchor, not each rank's
    # parameters: those differ by the local steps taken in flight, and a lower group whose ranks held
    # different anchors would never agree again (each rank's offset survives every later sync).
    anchors.set_below(lv.period, lv.anchors)


def settle(anchors: Any, why: str) -> None:
    """Before the groups change (``why``): finish a sync whose reduction is done, drop one that failed
    (WARNING). A ``"replicas"`` sync (reduced at completion, across groups) stays in flight."""
    flight = anchors.in_flight
    if flight is None or (flight._thread is None and not flight.reduced):
        return
    try:
        flight.wait()
    except RuntimeError as exc:
        anchors.in_flight = None
        warn_dropped(flight, f"{why}; its reduction failed: {exc}")
        return
    finish(anchors)


def discard(anchors: Any) -> None:
    """Forget the sync in flight (a loaded state replaces it), once its reduction stopped."""
    flight, anchors.in_flight = anchors.in_flight, None
    if flight is not None and flight._thread is not None:
        flight._thread.join()


def dedicated_groups(
    levels: Sequence[Level], delays: Mapping[int, int], group: dist.ProcessGroup, owned: list[dist.ProcessGroup]
) -> dict[int, dist.ProcessGroup]:
    """Period -> this rank's group of its own for each delayed level; collective over ``group``'s ranks.

    The background reduction must be the only user of its group (gloo runs
    collectives from another thread only on a group no other thread uses), and
    the level's ordinary group may be ``group`` itself, which training and
    checkpoints share. Every rank creates every block, in the same order.
    """
    world_size = dist.get_world_size(group)
    members = dist.get_process_group_ranks(group)
    me = dist.get_rank(group)
    made: dict[int, dist.ProcessGroup] = {}
    for level in levels:
        if level.period not in delays:
            continue
        for block in contiguous_blocks(world_size, level.group_size):
            subgroup = dist.new_group([members[i] for i in block])
            owned.append(subgroup)
            if me in block:
                made[level.period] = subgroup
    return made


def warn_dropped(flight_or_saved: Any, why: str) -> None:
    """The one WARNING for an in-flight sync given up: no correction, the anchor stays, nothing is lost
    (the level's next sync carries the local steps since its last one)."""
    period = flight_or_saved["period"] if isinstance(flight_or_saved, Mapping) else flight_or_saved.period
    logger.warning(
        "the overlapped sync of period %s in flight is dropped (%s): the parameters keep their local steps and the "
        "level's anchor stays, so its next sync carries them.",
        period,
        why,
    )

