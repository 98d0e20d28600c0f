"""Hierarchical model averager: torch's API and step semantics, plus a step
counter that survives checkpoints, subgroups that follow elastic membership,
and averaging without a per-call copy of the model.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging.averagers import ModelAverager

from . import outer
from .flat_params import LOW_PRECISION, AveragingInputs, FlatParameterBuffers, average_by_copy, pack_by_kind, unpack_by_kind
from .hierarchy import (
    REPLICAS,
    GroupSizeSpec,
    Level,
    check_replicas_level,
    contiguous_blocks,
    level_for_step,
    normalize_config,
    repeated_group_sizes,
    resolve_levels,
)
from .outer import OuterOptimizerFactory
from .process_groups import agree, release_at_exit, release_group

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass
class AnchoredLevel:
    """A level that keeps an anchor: one flat anchor per parameter buffer, and its outer optimizer."""

    period: int
    make_optimizer: OuterOptimizerFactory | None
    comm_dtype: torch.dtype | None
    anchors: list[torch.Tensor] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class WireBuffers:
    """A compressed level's buffers for one (device, size, wire dtype, group size), reused every call."""

    wire: torch.Tensor
    received: torch.Tensor
    mean_out: torch.Tensor
    total: torch.Tensor
    row: torch.Tensor
    chunk: int
    wire_scales: torch.Tensor
    received_scales: torch.Tensor
    mean_scales: torch.Tensor
    work: torch.Tensor
    spare: torch.Tensor

    def scales_of(self, scales: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The int8 scales of wire elements ``[start, stop)`` (whole rows)."""
        return scales[start // outer.INT8_ROW : stop // outer.INT8_ROW]

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer, for storage checks."""
        return [v for v in (getattr(self, f.name) for f in fields(self)) if isinstance(v, torch.Tensor)]


class TopLevel(Protocol):
    """A top level that spans more than this process group (e.g. torchft replica groups).

    The averager hands it the flat parameter buffers and its own group; it
    averages them in place and says whether the result was committed (``False``:
    the sync was discarded and the buffers are as they were).
    """

    def average(self, flats: list[torch.Tensor], group: dist.ProcessGroup, step: int) -> bool: ...


class HierarchicalModelAverager(ModelAverager):
    r"""Average parameters over a hierarchy of process groups with different periods.

    Same constructor and stepping as
    :class:`torch.distributed.algorithms.model_averaging.hierarchical_model_averager.HierarchicalModelAverager`:
    each call to :meth:`average_parameters` averages, once ``step >= warmup_steps``,
    over the group of the largest period dividing ``step``, then increments ``step``.

    Differences: group sizes may be ``"local"`` (processes per node, from
    ``LOCAL_WORLD_SIZE``) or ``"world"``, so one configuration survives world-size
    changes; :meth:`state_dict` / :meth:`load_state_dict` carry the step across
    restarts; :meth:`rebuild` re-creates the subgroups for a new membership; and
    parameters are kept as views of flat buffers, so averaging is one in-place
    all_reduce.

    Args:
        period_group_size_dict: ordered mapping of averaging period to group size,
            periods strictly increasing, last size the whole ``process_group``.
        warmup_steps: steps during which no averaging happens (the post-local-SGD
            hook all-reduces gradients instead).
        process_group: the overall group; ``None`` means the default group.
        outer_optimizers: period -> callable taking a list of tensors and returning
            a ``torch.optim.Optimizer``, e.g. ``{32: functools.partial(torch.optim.SGD,
            lr=0.7, momentum=0.9, nesterov=True)}``; that level runs DiLoCo's outer step.
        comm_dtypes: period -> dtype the level's pseudo-gradient travels in
            (``torch.bfloat16`` or ``torch.float16``), summed in fp32.
        local_world_size: size used for ``"local"``; default ``LOCAL_WORLD_SIZE``.
        anchor_device: where anchors and outer-optimizer state live, e.g. ``"cpu"``
            to keep them in (pinned, when the parameters are on CUDA) host memory;
            default: beside the parameters.
        top_level: averages the last level across replica groups; required
            exactly when that level is ``"replicas"`` (see :mod:`elastic_hsgd.ft`).

    Anchored levels (hierarchical DiLoCo). A level with an outer optimizer or a
    comm dtype keeps an **anchor**: the parameters as they were when its group was
    last synchronized. Anchors start, at the first call at or after warmup, as the
    mean of the parameters over the whole ``process_group`` (one extra all-reduce,
    once), so they agree on every rank even without DDP. When anchored level L fires:

    1. each rank computes ``delta = anchor_L - params``;
    2. ``delta`` is averaged over L's group (sent in ``comm_dtypes[L]`` if given,
       summed in fp32; see :mod:`elastic_hsgd.outer`);
    3. with an outer optimizer, ``anchor_L.grad = mean delta; outer_L.step()``;
       without, ``anchor_L -= mean delta``;
    4. ``params := anchor_L``.

    Whenever any level fires (anchored or not), every lower anchored level sets
    its anchor to the new parameters: its groups are now synchronized too. A
    level with neither option averages parameters exactly as torch does, with no
    extra memory. ``outer_optimizers={L: partial(torch.optim.SGD, lr=1.0)}``
    equals plain averaging. With one level, outer Nesterov SGD and one call to
    :meth:`average_parameters` before the first optimizer step (which starts the
    anchor at the initial parameters), the schedule and result are those of
    torchft's ``DiLoCo(sync_every=period)``. Memory: one extra copy of the
    parameters per anchored level, plus the outer optimizer's state and one
    shared pseudo-gradient buffer (and, for a comm dtype, wire buffers of the
    parameters' size in that dtype).

    Example::

        >>> # xdoctest: +SKIP("needs torchrun")
        >>> import torch, torch.distributed as dist
        >>> from elastic_hsgd import HierarchicalModelAverager
        >>> dist.init_process_group("gloo")
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> averager = HierarchicalModelAverager({2: "local", 8: "world"}, warmup_steps=10)
        >>> for step in range(100):
        ...     opt.zero_grad()
        ...     model(torch.randn(4, 8)).sum().backward()
        ...     opt.step()
        ...     averager.average_parameters(model.parameters())
        >>> checkpoint = averager.state_dict()  # plain Python values
        >>> # Hierarchical DiLoCo: plain averaging in the node, Nesterov outer steps
        >>> # on bf16 pseudo-gradients across nodes.
        >>> import functools
        >>> diloco = HierarchicalModelAverager(
        ...     {4: "local", 64: "world"},
        ...     outer_optimizers={64: functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)},
        ...     comm_dtypes={64: torch.bfloat16},
        ... )
    """

    #: Elements per all_reduce on CPU; see :meth:`_average`.
    CPU_CHUNK_ELEMENTS = 1 << 22
    #: Elements per chunk of a compressed level's pipeline on CPU: smaller than the plain
    #: path's, so that less of the casts and sums sits before the first send or after the
    #: last receive.
    CPU_WIRE_CHUNK_ELEMENTS = 1 << 20

    _instances: "weakref.WeakSet[HierarchicalModelAverager]" = weakref.WeakSet()

    @classmethod
    def instances(cls) -> list["HierarchicalModelAverager"]:
        """Averagers alive in this process (the checkpoint manager warns when a save leaves one out)."""
        return list(cls._instances)

    def __init__(
        self,
        period_group_size_dict: Mapping[int, GroupSizeSpec] | Sequence[tuple[int, GroupSizeSpec]],
        warmup_steps: int = 0,
        process_group: dist.ProcessGroup | None = None,
        *,
        outer_optimizers: Mapping[int, OuterOptimizerFactory] | None = None,
        comm_dtypes: Mapping[int, torch.dtype] | None = None,
        local_world_size: int | None = None,
        anchor_device: torch.device | str | None = None,
        top_level: TopLevel | None = None,
    ) -> None:
        config = normalize_config(period_group_size_dict)
        # Same config on every rank, so every rank raises here, before any collective.
        check_replicas_level(config, fault_tolerant=top_level is not None)
        factories, wire_dtypes = outer.check_level_options([period for period, _ in config], outer_optimizers, comm_dtypes)
        top_period = config[-1][0]
        if top_level is not None and top_period in wire_dtypes:
            raise ValueError(
                f"comm_dtypes[{top_period}] is set on the 'replicas' level, which averages through "
                "torchft's fp32 allreduce: leave it out there (an outer optimizer is fine) and put "
                "comm_dtypes on the levels inside the replica group."
            )
        #: An outer optimizer on the "replicas" level: anchors start at a committed top-level sync.
        self._top_anchored = top_level is not None and top_period in factories
        super().__init__(process_group)
        HierarchicalModelAverager._instances.add(self)
        self._config = config
        self.top_level = top_level
        #: Levels keeping an anchor, lowest period first; empty: torch's averaging, nothing more.
        self._anchored: list[AnchoredLevel] = [
            AnchoredLevel(period, factories.get(period), wire_dtypes.get(period))
            for period, _ in self._config
            if period in factories or period in wire_dtypes
        ]
        self._anchor_device = torch.device(anchor_device) if anchor_device is not None else None
        self._anchors_started = False
        self._resync_anchors = False
        self._pending_outer_state: dict[str, Any] | None = None
        self._deltas: list[torch.Tensor] = []  # one per flat buffer, shared by all levels
        self._host_grads: list[torch.Tensor] = []  # mean deltas on anchor_device, when it differs
        self._wire: dict[tuple[Any, ...], WireBuffers] = {}
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(
                f"warmup_steps {warmup_steps!r} must be a non-negative int (0 averages from step 0)."
            )
        if self._config[-1][0] == 1:
            warnings.warn(
                "The largest period in period_group_size_dict is 1: averaging parameters every "
                "step costs no less than DistributedDataParallel's gradient all-reduce; use plain "
                "DDP instead.",
                stacklevel=2,
            )
        self.warmup_steps = warmup_steps
        self._local_world_size = local_world_size
        self._owned_groups: list[dist.ProcessGroup] = []
        self._flat = FlatParameterBuffers()
        self._inputs = AveragingInputs()
        self._inputs_checked = False
        self.levels: tuple[Level, ...] = ()
        self._periods: tuple[int, ...] = ()
        self.period_process_group_dict: OrderedDict[int, dist.ProcessGroup] = OrderedDict()
        self.rebuild(process_group)
        self._resync_anchors = False
        release_at_exit(self.release_groups)

    @property
    def config(self) -> tuple[tuple[int, GroupSizeSpec], ...]:
        """The hierarchy as configured, ``(period, size spec)`` per level."""
        return self._config

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def rebuild(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Re-create the subgroups for the current membership. Collective.

        Call it on every rank after the process group was re-initialised in
        process. Destroys the subgroups this averager made before, resolves
        ``"local"``/``"world"`` again, and raises ``ValueError`` on every rank
        (no rank hangs) if the hierarchy no longer fits the world.
        """
        self._destroy_owned_groups()
        # Lower levels' groups change with the membership: re-agree on anchors at the next call.
        self._resync_anchors = self._anchors_started
        overall = process_group if process_group is not None else dist.group.WORLD
        if overall is None:
            raise RuntimeError("torch.distributed is not initialised: call init_process_group() first.")
        self.process_group = overall
        world_size = dist.get_world_size(self.process_group)
        local_world_size = self._local_world_size
        if local_world_size is None and "LOCAL_WORLD_SIZE" in os.environ:
            local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])

        try:
            levels: tuple[Level, ...] | None = resolve_levels(self._config, world_size, local_world_size)
            error = None
        except ValueError as exc:
            levels, error = None, str(exc)
        # "local" can differ between nodes, and a rank that raises alone would
        # leave the others hanging in new_group: agree first, then fail together.
        outcomes = agree((levels, error), self.process_group)
        errors = sorted({e for _, e in outcomes if e is not None})
        if errors:
            raise ValueError(f"hierarchy {dict(self._config)} does not fit world size {world_size}: {errors[0]}")
        if len({lv for lv, _ in outcomes}) != 1:
            raise ValueError(
                f"ranks resolved hierarchy {dict(self._config)} differently ({sorted({str(lv) for lv, _ in outcomes})}): "
                "'local' must mean the same number of processes on every node."
            )
        assert levels is not None
        self.levels = levels
        self._periods = tuple(lv.period for lv in levels)
        self.period_process_group_dict = OrderedDict()
        member_ranks = dist.get_process_group_ranks(self.process_group)
        my_group_rank = dist.get_rank(self.process_group)
        by_size: dict[int, dist.ProcessGroup] = {world_size: self.process_group}
        for level in levels:
            if level.group_size not in by_size:
                # Every rank creates every block, in the same order, as new_subgroups does.
                for block in contiguous_blocks(world_size, level.group_size):
                    group = dist.new_group([member_ranks[i] for i in block])
                    self._owned_groups.append(group)
                    if my_group_rank in block:
                        by_size[level.group_size] = group
            self.period_process_group_dict[level.period] = by_size[level.group_size]
        if my_group_rank == 0:
            for lower, upper in repeated_group_sizes(levels):
                if dict(self._config)[upper.period] == REPLICAS:
                    continue  # spans every replica group, beyond this group
                logger.warning(
                    "levels %s (period %d) and %s (period %d) both resolve to groups of %d with world size %d "
                    "(local world size %s): the lower level averages the same group as the upper one, just more "
                    "often. On one node 'local' is the whole world; use an int group size or run on more nodes.",
                    dict(self._config)[lower.period], lower.period, dict(self._config)[upper.period], upper.period,
                    lower.group_size, world_size, local_world_size,
                )
        logger.info(
            "averaging hierarchy for world size %d: %s (warmup %d steps)",
            world_size,
            ", ".join(f"groups of {lv.group_size} every {lv.period} steps" for lv in levels),
            self.warmup_steps,
        )

    def release_groups(self) -> None:
        """Destroy the subgroups this averager made and forget its groups; it
        cannot average afterwards (call :meth:`rebuild` to use it again).
        Done at interpreter exit so gloo's threads are joined in time."""
        self._destroy_owned_groups()
        self.period_process_group_dict = OrderedDict()
        self.levels, self._periods = (), ()

    def _destroy_owned_groups(self) -> None:
        for group in self._owned_groups:
            release_group(group)
        self._owned_groups = []

    def average_parameters(self, params: Iterable[Any]) -> None:
        """Average ``model.parameters()`` or ``optimizer.param_groups`` if this step fires."""
        index = level_for_step(self.step, self.warmup_steps, self._periods)
        start_anchors = bool(self._anchored) and self.step >= self.warmup_steps and (
            (not self._anchors_started and not self._top_anchored)
            or self._resync_anchors
            or self._pending_outer_state is not None
        )
        if index is not None or start_anchors or not self._inputs_checked:
            # Checked at the first call even during warmup, so a wrong input fails early.
            flat, by_copy = self._inputs.split(params)
            self._inputs_checked = True
            if by_copy and self._anchored:
                raise ValueError(
                    f"outer_optimizers/comm_dtypes need parameters that can live in flat buffers (dense, "
                    f"contiguous); got {len(by_copy)} sparse or non-contiguous parameter(s) (shapes "
                    f"{[list(p.shape) for p in by_copy[:4]]}): make them contiguous, or configure this "
                    "hierarchy without outer optimizers and comm dtypes."
                )
            if start_anchors:
                self._start_anchors(flat)
            if index is not None and self.top_level is not None and index == len(self.levels) - 1:
                # Step first: a group that heals during this sync adopts this
                # rank's state, which must already say where training resumes.
                self.step += 1
                group = self.period_process_group_dict[self.levels[index].period]
                self._sync_top(flat, by_copy, group)
                return
            if index is not None:
                if by_copy:
                    average_by_copy(by_copy, self.period_process_group_dict[self.levels[index].period])
                self._sync_level(index, flat)
        self.step += 1

    def _sync_level(self, index: int, params: list[torch.Tensor]) -> None:
        period = self.levels[index].period
        group = self.period_process_group_dict[period]
        anchored = self._anchored_level(period)
        if anchored is None or not self._anchors_started:
            # Not started only below an anchored "replicas" level, until its first committed sync.
            self._average(params, group)
        else:
            self._outer_sync(anchored, params, group)
        self._reset_anchors_below(period, params)

    def _reset_anchors_below(self, period: int, params: list[torch.Tensor]) -> None:
        """Anchored levels below ``period`` take the new parameters: their groups are synchronized too."""
        if not self._anchors_started:
            return
        below = [lv for lv in self._anchored if lv.period < period]
        if below:
            buffers = self._flat_buffers(params)
            with torch.no_grad():
                for lv in below:
                    for anchor, flat in zip(lv.anchors, buffers):
                        anchor.copy_(flat)

    def _anchored_level(self, period: int) -> AnchoredLevel | None:
        for lv in self._anchored:
            if lv.period == period:
                return lv
        return None

    def sync_top_level(self, params: Iterable[Any]) -> bool:
        """Run the top level's sync now, without stepping; ``True`` if committed.

        Fault-tolerant jobs call it to join (or leave) at a sync every replica
        group takes part in: at start, where a joining group heals, and at the end.
        It takes every parameter that requires a gradient (a joiner has none
        yet), so every parameter must get one in training, as under DDP.
        """
        if self.top_level is None:
            raise RuntimeError("sync_top_level() needs a top_level (a 'replicas' hierarchy).")
        flat, by_copy = self._inputs.split(params, with_grad_only=False)
        return self._sync_top(flat, by_copy, self.process_group)

    def _sync_top(self, flat: list[torch.Tensor], by_copy: list[torch.Tensor], group: dist.ProcessGroup) -> bool:
        """One sync of the top level (across replica groups); ``True`` if committed."""
        top_period = self.levels[-1].period
        anchored = self._anchored_level(top_period) if self._top_anchored else None
        if anchored is None:
            committed = self._average_top(flat, by_copy, group)
        else:
            if by_copy:
                raise ValueError(
                    f"outer_optimizers need parameters that can live in flat buffers; got {len(by_copy)} sparse "
                    "or non-contiguous parameter(s): make them contiguous."
                )
            committed = self._outer_sync_top(anchored, flat, group)
        if committed and self._anchors_started:
            if anchored is None:
                # A group that healed in this sync may hold the peer's anchors only as loaded
                # state (it had none allocated): apply them before lower levels take the new params.
                self._anchor_ready_buffers(flat)
            self._reset_anchors_below(top_period, flat)
        return committed

    def _outer_sync_top(self, lv: AnchoredLevel, params: list[torch.Tensor], group: dist.ProcessGroup) -> bool:
        """The anchored "replicas" level: an outer step on the pseudo-gradient averaged across groups.

        Which mean a sync carries depends on state every group shares: with anchors
        started, ``anchor - params`` (the outer step follows); before, the parameters
        themselves (plain averaging; at or after warmup every anchor then starts at
        that mean). A group that heals inside the sync contributes nothing and
        adopts a live peer's state, anchors and outer-optimizer state included,
        before the result is applied, so it reads the result as its peers do.
        A discarded sync changes nothing: the next one carries the steps since.
        """
        assert self.top_level is not None
        buffers = self._anchor_ready_buffers(params)
        with torch.no_grad():
            for anchor, flat, delta in zip(lv.anchors, buffers, self._deltas):
                if self._anchors_started:
                    delta.copy_(anchor, non_blocking=anchor.device != delta.device)
                    delta.sub_(flat)
                else:
                    delta.copy_(flat)
            # A heal happens in here: it loads a peer's state into the parameters,
            # the anchors and the outer optimizer (load_state_dict applies it at once,
            # the anchors being allocated above).
            if not self.top_level.average(list(self._deltas), group, self.step):
                return False
            if not self._anchors_started:
                for flat, mean in zip(buffers, self._deltas):
                    flat.copy_(mean)
                if self.step >= self.warmup_steps:
                    for level in self._anchored:
                        for anchor, flat in zip(level.anchors, buffers):
                            anchor.copy_(flat)
                    self._anchors_started = True
                    self._resync_anchors = False
                return True
            self._step_anchors(lv, list(zip(lv.anchors, self._deltas, buffers, self._host_grads)))
        return True

    def _average_top(self, flat: list[torch.Tensor], by_copy: list[torch.Tensor], group: dist.ProcessGroup) -> bool:
        """``flat`` averaged in their buffers, ``by_copy`` through packed copies
        (16-bit ones in float32), all in one call to the top level."""
        assert self.top_level is not None
        buffers = self._flat.buffers_for(flat) if flat else []
        assert buffers is not None  # AveragingInputs.split keeps only flattenable ones in flat
        with torch.no_grad():
            packed = pack_by_kind(by_copy)
            committed = self.top_level.average(list(buffers) + [t for _, t in packed], group, self.step)
            if committed:
                for members, t in packed:
                    unpack_by_kind(members, t)
        return committed

    def _average(self, params: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        if not params:
            return
        buffers = self._flat.buffers_for(params)
        if buffers is None:
            average_by_copy(params, group)
            return
        self._mean_in_place(buffers, group)

    def _mean_in_place(self, buffers: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        """Each buffer := its mean over ``group`` (16-bit buffers reduced in float32)."""
        size = dist.get_world_size(group)
        pending = []
        upcast: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for flat in buffers:
                if flat.dtype in LOW_PRECISION:
                    # Summing world-size terms in 16 bits loses what torch's averager
                    # (which concatenates mixed dtypes in float32) keeps: reduce in
                    # float32, round once.
                    wide = flat.float()
                    upcast.append((flat, wide))
                    flat = wide
                if flat.device.type == "cuda":
                    # As torch's averager does: an all_reduce on another stream must
                    # not race the optimizer's kernels still writing this buffer.
                    torch.cuda.synchronize(flat.device)
                    chunks = [flat]
                else:
                    # On CPU, dividing chunk k+1 overlaps the reduction of chunk k,
                    # which hides the division's pass over memory.
                    chunks = list(flat.split(self.CPU_CHUNK_ELEMENTS))
                for chunk in chunks:
                    # Divide first, like torch, so results match it bit for bit.
                    chunk.div_(size)
                    pending.append(dist.all_reduce(chunk, group=group, async_op=True))
            for work in pending:
                work.wait()
            for narrow, wide in upcast:
                narrow.copy_(wide)

    # -- anchored levels ---------------------------------------------------------------

    def _flat_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        buffers = self._flat.buffers_for(params)
        if buffers is None:
            raise ValueError(
                "outer_optimizers/comm_dtypes need parameters that can live in flat buffers (dense, "
                "contiguous); got a sparse or non-contiguous parameter: make it contiguous, or "
                "configure this hierarchy without outer optimizers and comm dtypes."
            )
        return buffers

    def _anchor_ready_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The flat buffers of ``params``, with anchors allocated and any loaded outer state applied."""
        buffers = self._flat_buffers(params)
        if not self._deltas:
            self._allocate(buffers)
        self._check_layout(buffers)
        if self._pending_outer_state is not None:
            self._apply_outer_state(self._pending_outer_state)
            self._pending_outer_state = None
        return buffers

    def _start_anchors(self, params: list[torch.Tensor]) -> None:
        """Anchors := mean of the parameters over the whole group (collective, once).

        After a membership change (:meth:`rebuild`, or a checkpoint from another
        world size) the existing anchors and outer-optimizer state are averaged
        over the new world instead, so every rank agrees on them.
        """
        buffers = self._anchor_ready_buffers(params)
        with torch.no_grad():
            if not self._anchors_started:
                for delta, flat in zip(self._deltas, buffers):
                    delta.copy_(flat)
                self._mean_in_place(self._deltas, self.process_group)
                for lv in self._anchored:
                    for anchor, mean in zip(lv.anchors, self._deltas):
                        anchor.copy_(mean)
            elif self._resync_anchors:
                tensors = [a for lv in self._anchored for a in lv.anchors]
                tensors += [t for lv in self._anchored for t in _optimizer_tensors(lv.optimizer)]
                tensors = [t for t in tensors if t.is_floating_point()]
                device = buffers[0].device if buffers else None
                # Host-resident state (anchor_device="cpu") travels through the parameters'
                # device, which the backend (NCCL) serves; only at a membership change.
                staged = [t.to(device) if device is not None and t.device != device else t for t in tensors]
                self._mean_in_place(staged, self.process_group)
                for t, s in zip(tensors, staged):
                    if s is not t:
                        t.copy_(s)
        self._anchors_started = True
        self._resync_anchors = False

    def _allocate(self, buffers: list[torch.Tensor]) -> None:
        pin = self._anchor_device is not None and self._anchor_device.type == "cpu" and any(
            b.device.type == "cuda" for b in buffers
        )

        def on_anchor_device(flat: torch.Tensor) -> torch.Tensor:
            device = self._anchor_device or flat.device
            return torch.zeros(flat.numel(), dtype=flat.dtype, device=device, pin_memory=pin and device.type == "cpu")

        self._deltas = [torch.empty_like(b) for b in buffers]
        self._host_grads = [
            on_anchor_device(b) if self._anchor_device is not None and self._anchor_device != b.device else b[:0]
            for b in buffers
        ]
        self._wire = {}
        for lv in self._anchored:
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
        have = [(d.numel(), d.dtype) for d in self._deltas]
        got = [(b.numel(), b.dtype) for b in buffers]
        if have != got:
            raise ValueError(
                f"the parameters being averaged form flat buffers of (elements, dtype) {got} but this "
                f"averager's anchors were built for {have}: pass the same parameters on every call."
            )

    def _outer_sync(self, lv: AnchoredLevel, params: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        buffers = self._flat_buffers(params)
        self._check_layout(buffers)
        with torch.no_grad():
            grads = []
            for anchor, flat, delta, host in zip(lv.anchors, buffers, self._deltas, self._host_grads):
                same_device = anchor.device == flat.device
                if not same_device:
                    delta.copy_(anchor, non_blocking=True)
                    outer.pseudo_gradient(delta, flat, out=delta)
                if lv.comm_dtype is None:
                    if same_device:
                        outer.pseudo_gradient(anchor, flat, out=delta)
                    self._mean_in_place([delta], group)
                else:
                    finish = lv.optimizer is None and same_device
                    self._compressed_mean(anchor, flat, delta, lv.comm_dtype, group, same_device, finish)
                    if finish:
                        continue  # anchor -= mean delta and params := anchor already happened per chunk
                grads.append((anchor, delta, flat, host))
            self._step_anchors(lv, grads)

    @staticmethod
    def _step_anchors(lv: AnchoredLevel, grads: list[tuple[torch.Tensor, ...]]) -> None:
        """Step each anchor with its mean pseudo-gradient, then ``params := anchor``.

        ``grads`` holds ``(anchor, mean delta, flat params, host buffer)``; a mean
        delta on another device than its anchor goes through the host buffer.
        """
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
        for anchor, _, flat in staged:
            flat.copy_(anchor, non_blocking=anchor.device != flat.device)

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

        Chunk by chunk, so that on CPU the passes over memory of one chunk overlap
        the transfers of the others: compute ``anchor - flat`` (if
        ``compute_delta``) and cast it into the wire buffer before sending; after
        receiving, cast back into ``delta`` and, if ``finish``, also do
        ``anchor -= delta; flat := anchor``. Separate same-dtype passes and
        casting copies: on CPU, elementwise ops that mix dtypes are several
        times slower than both together.
        """
        buffers = self._wire_buffers(delta, wire_dtype, group)
        wire, numel = buffers.wire, delta.numel()

        def produce(start: int, stop: int) -> None:
            end = min(stop, numel)
            if compute_delta:
                outer.pseudo_gradient(anchor[start:end], flat[start:end], out=delta[start:end])
            # int8 quantizes in place when this chunk of delta is fp32 whole rows (it is scratch now).
            whole = end == stop and delta.dtype == torch.float32
            work = delta[start:end] if whole else buffers.work[: stop - start]
            scales = buffers.scales_of(buffers.wire_scales, start, stop)
            outer.encode(delta[start:end], wire[start:stop], scales, work, buffers.spare[: stop - start])

        def consume(start: int, stop: int) -> None:
            end = min(stop, numel)
            outer.decode(wire[start:stop], delta[start:end], buffers.scales_of(buffers.wire_scales, start, stop), buffers.work)
            if finish:
                outer.outer_update(anchor[start:end], delta[start:end], None)
                flat[start:end].copy_(anchor[start:end])

        self._exchange_compressed(buffers, group, produce, consume)

    def _wire_buffers(self, delta: torch.Tensor, wire_dtype: torch.dtype, group: dist.ProcessGroup) -> "WireBuffers":
        size = dist.get_world_size(group)
        key = (delta.device, delta.numel(), wire_dtype, size)
        if key not in self._wire:
            padded, _ = outer.wire_layout(delta.numel(), size, wire_dtype)
            unit = size * (outer.INT8_ROW if wire_dtype == torch.int8 else 1)
            chunk = padded if delta.device.type == "cuda" else max(unit, self.CPU_WIRE_CHUNK_ELEMENTS // unit * unit)
            chunk = min(chunk, padded) if padded else unit
            device = delta.device
            rows = outer.scale_count(padded, wire_dtype)
            int8 = wire_dtype == torch.int8

            def fp32(n: int) -> torch.Tensor:
                return torch.empty(n, dtype=torch.float32, device=device)

            self._wire[key] = WireBuffers(
                wire=torch.empty(padded, dtype=wire_dtype, device=device),  # my delta, then the gathered mean
                received=torch.empty(padded, dtype=wire_dtype, device=device),  # everyone's slice of mine
                mean_out=torch.empty(padded, dtype=wire_dtype, device=device),  # my slice of the mean, once per rank
                total=fp32(chunk // size),  # fp32 sum of my slice
                row=fp32(chunk // size),  # one received slice in fp32
                chunk=chunk,
                wire_scales=fp32(rows),
                received_scales=fp32(rows),
                mean_scales=fp32(rows),
                work=fp32(chunk if int8 else 0),  # int8: quantization scratch
                spare=fp32(chunk if int8 else 0),
            )
        return self._wire[key]

    def _exchange_compressed(
        self,
        buffers: "WireBuffers",
        group: dist.ProcessGroup,
        produce: Callable[[int, int], None],
        consume: Callable[[int, int], None],
    ) -> None:
        """Average the wire buffer over ``group`` in the wire dtype both ways, summed in fp32.

        A reduce-scatter and an all-gather, each as one ``all_to_all`` (gloo's
        all-gather is slower than its all-to-all), over chunks:
        ``produce(start, stop)`` fills a chunk of the wire buffer just before it
        is sent, and ``consume(start, stop)`` reads the chunk's mean as soon as
        it is back, so the passes over memory overlap the transfers. int8 rows'
        scales travel beside their values, in their own all_to_all.
        """
        b = buffers
        wire, received, mean_out = b.wire, b.received, b.mean_out
        size = dist.get_world_size(group)
        int8 = wire.dtype == torch.int8
        bounds = [(start, min(start + b.chunk, wire.numel())) for start in range(0, wire.numel(), b.chunk)]

        def exchange(out: torch.Tensor, inp: torch.Tensor, out_scales: torch.Tensor, in_scales: torch.Tensor, start: int, stop: int) -> list[Any]:
            if wire.device.type == "cuda":
                torch.cuda.synchronize(wire.device)
            works = [dist.all_to_all_single(out[start:stop], inp[start:stop], group=group, async_op=True)]
            if int8:
                works.append(dist.all_to_all_single(
                    b.scales_of(out_scales, start, stop), b.scales_of(in_scales, start, stop), group=group, async_op=True
                ))
            return works

        scatters = []
        for start, stop in bounds:
            produce(start, stop)
            scatters.append(exchange(received, wire, b.received_scales, b.wire_scales, start, stop))
        gathers = []
        for (start, stop), works in zip(bounds, scatters):
            for work in works:
                work.wait()
            per_rank = (stop - start) // size
            m = mean_out[start:stop]
            mine = m[:per_rank]
            m_scales = b.scales_of(b.mean_scales, start, stop)  # empty unless int8
            rows = m_scales.numel() // size
            outer.reduce_slices(
                received[start:stop], size, b.total[:per_rank], mine, b.row[:per_rank],
                b.scales_of(b.received_scales, start, stop), m_scales[:rows], b.spare[:per_rank],
            )
            # all_to_all sends slot j to rank j: every slot carries this rank's slice of the mean.
            m.view(size, per_rank)[1:].copy_(mine.expand(size - 1, per_rank))
            m_scales.view(size, rows)[1:].copy_(m_scales[:rows].expand(size - 1, rows))
            gathers.append(exchange(wire, mean_out, b.wire_scales, b.mean_scales, start, stop))
        for (start, stop), works in zip(bounds, gathers):
            for work in works:
                work.wait()
            consume(start, stop)

    def state_dict(self) -> dict[str, Any]:
        """The step, warmup, the hierarchy configured and resolved: plain Python values.

        With anchored levels, also ``"outer"``: each level's options, its anchors
        (one flat tensor per parameter buffer) and its outer optimizer's
        ``state_dict()``, tensors included (live references, as torch's do).
        """
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "step": self.step,
            "warmup_steps": self.warmup_steps,
            "config": [[period, spec] for period, spec in self._config],
            "levels": [[lv.period, lv.group_size] for lv in self.levels],
            "world_size": self.world_size,
        }
        if self._anchored:
            state["outer"] = self._outer_state_dict()
        return state

    def _outer_options(self) -> list[list[Any]]:
        return [
            [lv.period, _dtype_name(lv.comm_dtype), lv.optimizer is not None or lv.make_optimizer is not None]
            for lv in self._anchored
        ]

    def _outer_state_dict(self) -> dict[str, Any]:
        if self._pending_outer_state is not None:
            return self._pending_outer_state  # loaded, not yet applied: save it unchanged
        state: dict[str, Any] = {"levels": self._outer_options(), "started": self._anchors_started}
        if self._anchors_started:
            state["anchors"] = {str(lv.period): list(lv.anchors) for lv in self._anchored}
            state["optimizers"] = {
                str(lv.period): lv.optimizer.state_dict() for lv in self._anchored if lv.optimizer is not None
            }
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the step after checking the saved hierarchy matches this one.

        A world-size change since the save is fine where the configuration still
        resolves (e.g. ``"world"``); the top level must span the current world.
        """
        missing = {"step", "warmup_steps", "config", "world_size"} - set(state_dict)
        if missing:
            raise ValueError(f"averager state is missing {sorted(missing)}: was it made by state_dict()?")
        saved_config = tuple((int(p), s) for p, s in state_dict["config"])
        if saved_config != self._config:
            raise ValueError(
                f"checkpoint was saved with hierarchy {dict(saved_config)} but this averager has "
                f"{dict(self._config)}: build the averager with the saved hierarchy, or start a "
                "new run."
            )
        if int(state_dict["warmup_steps"]) != self.warmup_steps:
            raise ValueError(
                f"checkpoint was saved with warmup_steps={state_dict['warmup_steps']} but this "
                f"averager has warmup_steps={self.warmup_steps}: use the saved value so warmup "
                "is neither repeated nor cut short."
            )
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"saved step {step!r} is not a non-negative int.")
        world_size = self.world_size
        if self.levels[-1].group_size != world_size:
            raise ValueError(
                f"top level of the hierarchy spans {self.levels[-1].group_size} ranks but the "
                f"world has {world_size}: call rebuild() after the membership changed."
            )
        saved_world = int(state_dict["world_size"])
        if saved_world != world_size:
            logger.info(
                "averager resumes at step %d with world size %d -> %d, hierarchy %s",
                step,
                saved_world,
                world_size,
                [(lv.period, lv.group_size) for lv in self.levels],
            )
        self._load_outer_state(state_dict.get("outer"), world_changed=saved_world != world_size)
        self.step = step

    def _load_outer_state(self, saved: Mapping[str, Any] | None, world_changed: bool) -> None:
        if saved is None and not self._anchored:
            return
        if saved is None or not self._anchored:
            raise ValueError(
                f"checkpoint has {'no ' if saved is None else ''}outer state (anchors / outer optimizers) but "
                f"this averager has {'none' if not self._anchored else self._outer_options()}: configure "
                "outer_optimizers and comm_dtypes as when the checkpoint was saved."
            )
        levels = [[int(p), d, bool(o)] for p, d, o in saved["levels"]]
        if levels != self._outer_options():
            raise ValueError(
                f"checkpoint's anchored levels [period, comm dtype, outer optimizer] are {levels} but this "
                f"averager has {self._outer_options()}: configure outer_optimizers and comm_dtypes as when "
                "the checkpoint was saved."
            )
        if not saved["started"]:
            self._pending_outer_state = None
            self._anchors_started = False
            return
        for lv in self._anchored:
            anchors = saved["anchors"][str(lv.period)]
            if not all(isinstance(a, torch.Tensor) and a.dim() == 1 for a in anchors):
                raise ValueError(f"checkpoint's anchors for period {lv.period} are not flat tensors.")
        self._pending_outer_state = dict(saved)
        self._anchors_started = True
        self._resync_anchors = world_changed
        if self._deltas:  # already running: anchors exist, apply (and check) now
            self._apply_outer_state(self._pending_outer_state)
            self._pending_outer_state = None

    def _apply_outer_state(self, saved: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for lv in self._anchored:
                expected = [(a.numel(), a.dtype) for a in lv.anchors]
                anchors = saved["anchors"][str(lv.period)]
                got = [(a.numel(), a.dtype) for a in anchors]
                if got != expected:
                    raise ValueError(
                        f"checkpoint's anchors for period {lv.period} have (elements, dtype) {got} but the "
                        f"parameters being averaged have {expected}: resume with the same model and "
                        "parameter set as the checkpoint."
                    )
                for anchor, value in zip(lv.anchors, anchors):
                    anchor.copy_(value)
                if lv.optimizer is not None:
                    lv.optimizer.load_state_dict(saved["optimizers"][str(lv.period)])


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _all_gather_single(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
