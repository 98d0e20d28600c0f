"""The ``"replicas"`` top level's contract: a level that spans more than this process group.

The averager does not know about torchft: its top level is any object with the
:class:`TopLevel` method, which averages flat buffers across replica groups
and says whether the result was committed (torchft's lives in
:mod:`elastic_hsgd.ft.replicas`). :class:`ReplicasLevel` is the averager's side
of one such sync: what it hands the top level, and what a committed or
discarded sync does to the parameters and the anchors.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from ..flat_params import FlatParameterBuffers, pack_by_kind, unpack_by_kind
from . import delayed
from .anchored import AnchoredLevel, AnchoredLevels
from .base import Owner, flat_buffers_needed


class TopLevel(Protocol):
    """A top level that spans more than this process group (e.g. torchft replica groups).

    The averager hands it the flat parameter buffers and its own group; it
    averages them in place and says whether the result was committed (``False``:
    the sync was discarded and the buffers are as they were).

    Example (every rank of every replica group in one gloo group ``cross``)::

        >>> # xdoctest: +SKIP("needs torch.distributed")
        >>> class AllRanks:
        ...     def average(self, flats, group, step):
        ...         for flat in flats:
        ...             cross.allreduce([flat]).wait()
        ...             flat.div_(cross.size())
        ...         return True
        >>> averager = HierarchicalModelAverager({2: "world", 8: "replicas"}, top_level=AllRanks())
    """

    def average(self, flats: list[torch.Tensor], group: dist.ProcessGroup, step: int) -> bool:
        """Average ``flats`` in place across the top level; ``True`` if committed, ``False`` if discarded."""
        ...


class ReplicasLevel:
    """The averager's side of a top-level sync across replica groups.

    Without an outer optimizer on the top level, the parameters (and packed
    copies of those that cannot live in flat buffers) are averaged through
    ``owner.top_level``; with one, the pseudo-gradient is, and the outer step
    follows. A committed sync resets the anchored levels below; a discarded one
    changes nothing. ``owner`` is read at each call: a group that heals inside
    the sync loads a peer's state, step and anchors included.

    Example::

        >>> # xdoctest: +SKIP("needs torch.distributed and a top level")
        >>> top = ReplicasLevel(weakref.proxy(averager), period=32, flat=flat, anchors=anchors)
        >>> flat_params, by_copy = AveragingInputs().split(model.parameters())
        >>> committed = top.sync(flat_params, by_copy, averager.process_group)
    """

    def __init__(self, owner: Owner, period: int, flat: FlatParameterBuffers, anchors: AnchoredLevels) -> None:
        self._owner = owner
        self.period = period
        self._flat = flat
        self._anchors = anchors

    def sync(
        self, flat: list[torch.Tensor], by_copy: list[torch.Tensor], group: dist.ProcessGroup,
        peers: dist.ProcessGroup | None = None,
    ) -> bool:
        """One sync of the top level (across replica groups); ``True`` if committed.

        ``group`` is this replica group (setups are agreed on over it); ``peers``
        (default ``group``) the ranks of it the top level averages with: for
        DTensor parameters, those holding this rank's slices. The top level
        pairs each rank with the same group rank of the other replica groups,
        which holds the same slices when every group shards the same way.
        """
        peers = group if peers is None else peers
        anchors = self._anchors
        anchored = anchors.level(self.period) if anchors.starts_at_top_sync else None
        if anchored is None:
            committed = self._average(flat, by_copy, peers)
        else:
            if by_copy:
                raise flat_buffers_needed(by_copy)
            committed = self._outer_sync(anchored, flat, group, peers)
        if committed and anchors.state.started:
            if anchored is None:
                # A group that healed in this sync may hold the peer's anchors only as loaded
                # state (it had none allocated): apply them before lower levels take the new params.
                anchors.ready(flat, group)
            anchors.reset_below(self.period, flat)
        return committed

    def fire(
        self, flat: list[torch.Tensor], by_copy: list[torch.Tensor], group: dist.ProcessGroup,
        peers: dist.ProcessGroup | None, delay: int,
    ) -> None:
        """The top level fires at this call, which it ends by stepping the owner's ``step``.

        With a ``delay`` (``sync_delays``) and started anchors it only snapshots the
        parameters: the reduction runs through the top level when it completes.
        """
        owner, anchors = self._owner, self._anchors
        if delay and anchors.state.started:
            delayed.start(anchors, anchors.levels[-1], flat, None, owner.step + delay)
            owner.step += 1
            return
        # Step first: a group that heals during this sync adopts this
        # rank's state, which must already say where training resumes.
        owner.step += 1
        self.sync(flat, by_copy, group, peers)

    def complete(
        self, flat: list[torch.Tensor], by_copy: list[torch.Tensor], group: dist.ProcessGroup,
        peers: dist.ProcessGroup | None, across: bool = True,
    ) -> None:
        """Complete the overlapped sync in flight (:mod:`.delayed`); a lower level's, or one of a
        top level without ``top_level``, is finished here and now.

        This level's, across replica groups (unless ``across`` is ``False``: the caller's
        own sync completes it), reduces its snapshot's pseudo-gradient through the top level
        now; discarded, it applies no correction (the parameters keep their local steps).
        The owner's ``step`` reads one more meanwhile: a group that heals in this sync
        adopts a peer's state, which must say that the peer's call is done.
        """
        flight = self._anchors.in_flight
        if flight is None:
            return
        if self._owner.top_level is None or flight.period != self.period:
            delayed.finish(self._anchors, flat)
            return
        if across:
            self._owner.step += 1
            try:
                self.sync(flat, by_copy, group, peers)
            finally:
                self._owner.step -= 1

    def mean(
        self, flat: list[torch.Tensor], by_copy: list[torch.Tensor], group: dist.ProcessGroup,
        peers: dist.ProcessGroup | None = None,
    ) -> bool:
        """The plain mean across replica groups, whatever the top level's options; ``True`` if committed.

        Every anchored level (the top one too) then takes the result as its anchor:
        :meth:`~elastic_hsgd.HierarchicalModelAverager.synchronize` with a top level.
        ``peers`` as in :meth:`sync`.
        """
        committed = self._average(flat, by_copy, group if peers is None else peers)
        anchors = self._anchors
        if committed and anchors.state.started:
            anchors.ready(flat, group)  # a group that healed in this sync applies the peer's anchors first
            anchors.reset_below(self.period + 1, flat)
        return committed

    def _average(self, flat: list[torch.Tensor], by_copy: list[torch.Tensor], group: dist.ProcessGroup) -> bool:
        """``flat`` averaged in their buffers, ``by_copy`` through packed copies
        (16-bit ones in float32), all in one call to the top level."""
        buffers = self._flat.buffers_for(flat) if flat else []
        assert buffers is not None  # AveragingInputs.split keeps only flattenable ones in flat
        with torch.no_grad():
            packed = pack_by_kind(by_copy)
            committed = self._owner.top_level.average(list(buffers) + [t for _, t in packed], group, self._owner.step)
            if committed:
                for members, t in packed:
                    unpack_by_kind(members, t)
        return committed

    def _outer_sync(
        self, lv: AnchoredLevel, params: list[torch.Tensor], group: dist.ProcessGroup, peers: dist.ProcessGroup
    ) -> bool:
        """The anchored top level: an outer step on the pseudo-gradient averaged across groups.

        Which mean a sync carries depends on state every group shares: with anchors
        started, ``anchor - params`` (the outer step follows); before, the parameters
        themselves (plain averaging; at or after warmup every anchor then starts at
        that mean). A group that heals inside the sync contributes nothing and
        adopts a live peer's state, anchors and outer-optimizer state included,
        before the result is applied, so it reads the result as its peers do.
        A discarded sync changes nothing: the next one carries the steps since.
        """
        anchors, owner = self._anchors, self._owner
        buffers = anchors.ready(params, group)
        # An overlapped sync (sync_delays) of this level completes here: the pseudo-gradient of its snapshot.
        flight = anchors.in_flight if anchors.in_flight is not None and anchors.in_flight.period == self.period else None
        with torch.no_grad():
            for anchor, flat, delta, since in zip(lv.anchors, buffers, anchors.deltas, flight.snapshot if flight else buffers):
                if anchors.state.started:
                    delta.copy_(anchor, non_blocking=anchor.device != delta.device)
                    delta.sub_(since)
                else:
                    delta.copy_(flat)
            # A heal happens in here: it loads a peer's state into the parameters,
            # the anchors and the outer optimizer (load_state_dict applies it at once,
            # the anchors being allocated above), and the peer's sync in flight, if any.
            committed = owner.top_level.average(list(anchors.deltas), peers, owner.step)
            flight = anchors.in_flight if anchors.in_flight is not None and anchors.in_flight.period == self.period else None
            if flight is not None:
                anchors.in_flight = None  # completed (committed) or given up (discarded: no correction)
            if not committed:
                return False
            if not anchors.state.started:
                for flat, mean in zip(buffers, anchors.deltas):
                    flat.copy_(mean)
                if owner.step >= owner.warmup_steps:
                    anchors.start_at(buffers)
                return True
            grads = list(zip(lv.anchors, anchors.deltas, buffers, anchors.host_grads))
            anchors.step_anchors(lv, grads, flight.snapshot if flight is not None else None)
        return True
