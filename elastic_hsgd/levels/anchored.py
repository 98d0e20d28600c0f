"""Anchored levels (hierarchical DiLoCo): anchors, outer optimizers, the pseudo-gradient sync,
and the reset of lower anchors.

A level with an outer optimizer or a comm dtype keeps an anchor: the parameters
as they were when its group last synchronized. It syncs by averaging
``delta = anchor - params`` over its group (in the wire dtype if it has one),
stepping the anchor with the mean and setting ``params := anchor``. Whenever
any level fires, the anchored levels below it take the new parameters as their
anchors. The maths is :mod:`elastic_hsgd.outer`; this module holds the state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .. import outer
from ..flat_params import FlatParameterBuffers, flattenable
from . import agreement, outer_state
from .anchors import Agreement, AnchoredLevel, AnchorState
from .base import flat_buffers_needed
from .delayed import InFlightSync, discard, restore, snapshot_buffers, warn_dropped
from .plain import PlainLevel
from .wire import WireMean

#: ``start``'s default mean group: the group the setup is agreed on.
SAME: Any = object()


class AnchoredLevels:
    """Every anchored level of one averager, with the buffers and the :class:`AnchorState` they share.

    Memory: one anchor per level and parameter buffer (on ``anchor_device``),
    the outer optimizers' state, one pseudo-gradient buffer per parameter buffer
    shared by all levels, a host copy of it when the anchors live elsewhere, and
    the wire buffers of compressed levels. Empty ``levels``: nothing is kept.

    Args:
        levels: the anchored levels, lowest period first.
        anchor_device: where anchors and outer state live; ``None``: beside the parameters.
        starts_at_top_sync: the ``"replicas"`` top level is anchored, so the
            anchors start at its first committed sync, not by a mean in this group.
        flat: the averager's flat buffers; ``plain``: the plain level, for means;
            ``wire``: the compressed levels' collective.

    Example::

        >>> # xdoctest: +SKIP("needs torch.distributed")
        >>> levels = AnchoredLevels([AnchoredLevel(8, None, torch.bfloat16)], anchor_device=None,
        ...                         starts_at_top_sync=False, flat=flat, plain=plain, wire=wire)
        >>> levels.start(params, dist.group.WORLD)   # anchors := mean of params (once)
        >>> levels.sync(levels.levels[0], params, dist.group.WORLD)
    """

    def __init__(
        self,
        levels: list[AnchoredLevel],
        *,
        anchor_device: torch.device | str | None,
        starts_at_top_sync: bool,
        flat: FlatParameterBuffers,
        plain: PlainLevel,
        wire: WireMean,
    ) -> None:
        self.levels = levels
        self.state = AnchorState()
        self.starts_at_top_sync = starts_at_top_sync
        self._anchor_device = torch.device(anchor_device) if anchor_device is not None else None
        self._flat = flat
        self._plain = plain
        self.wire = wire
        self.deltas: list[torch.Tensor] = []  # one per flat buffer, shared by all levels; empty until allocated
        self.host_grads: list[torch.Tensor] = []  # mean deltas on anchor_device, when it differs
        #: Ranks whose layouts must agree: 0 everywhere, or for DTensor parameters the position of
        #: this rank's slices in its replica (set by the averager; see :class:`~.agreement.Outcome`).
        self.cohort = 0
        #: The overlapped sync in flight (``sync_delays``), and each delayed level's snapshot buffers.
        self.in_flight: InFlightSync | None = None
        self.snapshots: dict[int, list[torch.Tensor]] = {}
        self.buffers: list[torch.Tensor] = []  # the flat parameter buffers of the last call

    @property
    def allocated(self) -> bool:
        """Whether the anchors and shared buffers exist (made at the first sync that needs them)."""
        return bool(self.deltas)

    def level(self, period: int) -> AnchoredLevel | None:
        """The anchored level of ``period``, if it is one."""
        for lv in self.levels:
            if lv.period == period:
                return lv
        return None

    def wants_start(self, warm: bool) -> bool:
        """Whether the next call must start, re-agree on or apply loaded anchors first."""
        state = self.state
        return bool(self.levels) and warm and (
            (state.agreement is Agreement.NOT_STARTED and not self.starts_at_top_sync)
            or state.agreement is Agreement.STALE
            or state.pending is not None
        )

    def membership_changed(self) -> None:
        """The groups changed (a rebuild): started anchors must be agreed on again."""
        if self.state.started:
            self.state.agreement = Agreement.STALE

    def start_at(self, values: list[torch.Tensor]) -> None:
        """Every level's anchors := ``values`` (the same on every rank): now agreed."""
        for lv in self.levels:
            lv.set_anchors(values)
        self.state.agreement = Agreement.AGREED

    def flat_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The flat buffers holding ``params``; raises if some cannot live in one."""
        buffers = self._flat.buffers_for(params)
        if buffers is None:
            raise flat_buffers_needed([p for p in params if not flattenable(p)])
        self.buffers = buffers
        return buffers

    def ready(self, params: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
        """The flat buffers of ``params``, with anchors allocated and any loaded outer state applied.

        With ``group``, a setup (allocating the anchors, applying a loaded state,
        re-agreeing after a membership change) is agreed on over it: every rank
        raises if any rank's setup failed or the ranks' parameters differ
        (:mod:`.agreement`; one small collective, at setups only).
        """
        buffers = self.flat_buffers(params)
        state = self.state
        if group is None or (self.allocated and state.pending is None and state.agreement is not Agreement.STALE):
            self._set_up(buffers)
            return buffers
        error = None
        try:
            self._set_up(buffers)
        except (ValueError, TypeError, RuntimeError, KeyError) as exc:  # raised below on every rank
            error = str(exc)
        kept = agreement.kept_state(self.levels) if error is None and state.agreement is Agreement.STALE else []
        agreement.agree_on(agreement.Outcome(agreement.layout_of(buffers), error, kept, self.cohort), group)
        return buffers

    def _set_up(self, buffers: list[torch.Tensor]) -> None:
        if not self.allocated:
            self._allocate(buffers)
        self._check_layout(buffers)
        if self.state.pending is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        pending = self.state.pending
        assert pending is not None
        outer_state.apply(self.levels, pending)
        if "in_flight" in pending:
            saved = pending["in_flight"]
            snapshot = snapshot_buffers(self, saved.get("period"))
            self.in_flight = restore(saved, self.levels, self.buffers, snapshot, self.deltas)
        self.state.pending = None

    def start(self, params: list[torch.Tensor], group: dist.ProcessGroup, mean_group: Any = SAME) -> None:
        """Anchors := mean of the parameters over ``group``, the whole group (collective, once).

        After a membership change (a rebuild, or a checkpoint from another
        world size) the existing anchors and outer-optimizer state are averaged
        over the new world instead, so every rank agrees on them. The setup is
        agreed on over ``group``; ``mean_group`` (default ``group``) is the
        group the mean is taken over: for DTensor parameters, the ranks of the
        world that hold this rank's slices, ``None`` when there is no other
        replica (nothing to average).
        """
        mean_group = group if mean_group is SAME else mean_group
        buffers = self.ready(params, group)
        with torch.no_grad():
            if not self.state.started:
                for delta, flat in zip(self.deltas, buffers):
                    delta.copy_(flat)
                if mean_group is not None:
                    self._plain.mean_in_place(self.deltas, mean_group)
                self.start_at(self.deltas)
            elif self.state.agreement is Agreement.STALE:
                # Floating state of one or more dimensions; 0-d and integer state (step counts) is
                # taken as is, agreed equal in ready() above.
                tensors = [a for lv in self.levels for a in lv.anchors]
                tensors += [v for lv in self.levels for _, v in agreement.optimizer_state(lv) if agreement.averaged(v)]
                device = buffers[0].device if buffers else None
                # Host-resident state (anchor_device="cpu") travels through the parameters'
                # device, which the backend (NCCL) serves; only at a membership change.
                staged = [t.to(device) if device is not None and t.device != device else t for t in tensors]
                if mean_group is not None:
                    self._plain.mean_in_place(staged, mean_group)
                for t, s in zip(tensors, staged):
                    if s is not t:
                        t.copy_(s)
        self.state.agreement = Agreement.AGREED

    def sync(self, lv: AnchoredLevel, params: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        """Level ``lv`` fires: average ``anchor - params`` over ``group``, step the anchor, ``params := anchor``."""
        buffers = self.flat_buffers(params)
        self._check_layout(buffers)
        with torch.no_grad():
            grads = []
            for anchor, flat, delta, host in zip(lv.anchors, buffers, self.deltas, self.host_grads):
                same_device = anchor.device == flat.device
                if not same_device:
                    delta.copy_(anchor, non_blocking=True)
                    outer.pseudo_gradient(delta, flat, out=delta)
                if lv.comm_dtype is None:
                    if same_device:
                        outer.pseudo_gradient(anchor, flat, out=delta)
                    self._plain.mean_in_place([delta], group)
                else:
                    finish = lv.optimizer is None and same_device
                    self._compressed_mean(anchor, flat, delta, lv.comm_dtype, group, same_device, finish)
                    if finish:
                        continue  # anchor -= mean delta and params := anchor already happened per chunk
                grads.append((anchor, delta, flat, host))
            self.step_anchors(lv, grads)

    def _compressed_mean(
        self,
        anchor: torch.Tensor,
        flat: torch.Tensor,
        delta: torch.Tensor,
        wire_dtype: torch.dtype,
        group: dist.ProcessGroup,
        compute_delta: bool,
        finish: bool,
    ) -> None:
        """``delta`` := the mean pseudo-gradient over ``group``, sent in ``wire_dtype``.

        Chunk by chunk: ``anchor - flat`` (if ``compute_delta``) just before the
        chunk is encoded and, if ``finish``, ``anchor -= delta; flat := anchor``
        as soon as its mean is decoded.
        """

        def pseudo_gradient(start: int, end: int) -> None:
            outer.pseudo_gradient(anchor[start:end], flat[start:end], out=delta[start:end])

        def step_and_copy(start: int, end: int) -> None:
            outer.outer_update(anchor[start:end], delta[start:end], None)
            flat[start:end].copy_(anchor[start:end])

        self.wire.mean(
            delta, wire_dtype, group, pseudo_gradient if compute_delta else None, step_and_copy if finish else None
        )

    @staticmethod
    def step_anchors(
        lv: AnchoredLevel, grads: list[tuple[torch.Tensor, ...]], snapshots: list[torch.Tensor] | None = None
    ) -> None:
        """Step each anchor with its mean pseudo-gradient, then ``params := anchor``
        (with ``snapshots``, an overlapped sync's end: ``params += anchor - snapshot``).

        ``grads`` holds ``(anchor, mean delta, flat params, host buffer)``; a mean
        delta on another device than its anchor goes through the host buffer.
        """
        scratch = [delta for _, delta, _, _ in grads]
        staged = []
        for anchor, delta, flat, host in grads:
            if anchor.device != delta.device:
                host.copy_(delta)
                delta = host
            staged.append((anchor, delta, flat))
        if lv.optimizer is None:
            for anchor, grad, _ in staged:
                outer.outer_update(anchor, grad, None)
        else:
            for anchor, grad, _ in staged:
                anchor.grad = grad
            outer.outer_step(lv.optimizer, lv.anchors)
        if snapshots is not None:
            for (anchor, _, flat), snapshot, out in zip(staged, snapshots, scratch):
                outer.delayed_correction(flat, anchor, snapshot, out)
            return
        for anchor, _, flat in staged:
            flat.copy_(anchor, non_blocking=anchor.device != flat.device)

    def reset_below(self, period: int, params: list[torch.Tensor]) -> None:
        """Anchored levels below ``period`` take the new parameters: their groups are synchronized too."""
        if not self.state.started:
            return
        if any(lv.period < period for lv in self.levels):
            self.set_below(period, self.flat_buffers(params))

    def set_below(self, period: int, buffers: list[torch.Tensor]) -> None:
        """Anchored levels below ``period`` take ``buffers`` (flat parameter buffers)."""
        with torch.no_grad():
            for lv in self.levels:
                if lv.period < period:
                    lv.set_anchors(buffers)

    def state_dict(self) -> dict[str, Any]:
        """The ``"outer"`` entry of the averager's state (see :mod:`.outer_state`)."""
        if self.state.pending is not None:
            return self.state.pending  # loaded, not yet applied: saved unchanged
        state = outer_state.capture(self.levels, self.state.started)
        if self.in_flight is not None:
            state["in_flight"] = self.in_flight.state_dict()
        return state

    def load_state_dict(self, saved: Mapping[str, Any] | None, world_changed: bool) -> None:
        """Check and take saved outer state: applied now if the anchors exist, else at the next sync."""
        if not outer_state.check_present(self.levels, saved):
            return
        assert saved is not None
        outer_state.check_options(self.levels, saved)
        discard(self)  # the loaded state says where training stands, in flight or not
        if not saved["started"]:
            self.state = AnchorState()
            return
        outer_state.check_anchors_flat(self.levels, saved)
        pending = dict(saved)
        if world_changed and "in_flight" in pending:
            # Its snapshot is each rank's own parameters at another membership.
            warn_dropped(pending.pop("in_flight"), "the checkpoint was saved with other groups")
        self.state = AnchorState(Agreement.STALE if world_changed else Agreement.AGREED, pending=pending)
        if self.allocated:  # already running: apply (and check) now
            self._apply_pending()

    def _allocate(self, buffers: list[torch.Tensor]) -> None:
        pin = self._anchor_device is not None and self._anchor_device.type == "cpu" and any(
            b.device.type == "cuda" for b in buffers
        )

        def on_anchor_device(flat: torch.Tensor) -> torch.Tensor:
            device = self._anchor_device or flat.device
            return torch.zeros(flat.numel(), dtype=flat.dtype, device=device, pin_memory=pin and device.type == "cpu")

        self.deltas = [torch.empty_like(b) for b in buffers]
        self.snapshots = {}
        self.host_grads = [
            on_anchor_device(b) if self._anchor_device is not None and self._anchor_device != b.device else b[:0]
            for b in buffers
        ]
        self.wire.clear()
        for lv in self.levels:
            lv.anchors = [on_anchor_device(b) for b in buffers]
            lv.optimizer = lv.make_optimizer(list(lv.anchors)) if lv.make_optimizer is not None else None
            if lv.optimizer is not None:
                given = [p for g in lv.optimizer.param_groups for p in g["params"]]
                if len(given) != len(lv.anchors) or any(p is not a for p, a in zip(given, lv.anchors)):
                    raise ValueError(
                        f"outer_optimizers[{lv.period}] returned an optimizer over other tensors than the "
                        "anchors it was given: build it over exactly the list passed in."
                    )

    def _check_layout(self, buffers: list[torch.Tensor]) -> None:
        have, got = agreement.layout_of(self.deltas), agreement.layout_of(buffers)
        if have != got:
            raise ValueError(agreement.layout_error(have, got))
