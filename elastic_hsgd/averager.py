"""Hierarchical model averager: torch's API and step semantics, plus a step
counter that survives checkpoints, subgroups that follow elastic membership,
and averaging without a per-call copy of the model.

The averager is a coordinator: it resolves the hierarchy and its groups
(:mod:`.topology`), checks its inputs once, and on each step calls the level
that fires, one of the kinds in :mod:`.levels` (plain, anchored with an optional
wire dtype, or the ``"replicas"`` top level). Each kind owns its state.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging.averagers import ModelAverager

from . import averager_state, ddp_hook_check, outer, topology
from .local_shards import is_dtensor
from .shard_groups import SliceGroups
from .averager_state import STATE_FORMAT  # noqa: F401 - importable from here, as it always was
from .flat_params import AveragingInputs, FlatParameterBuffers
from .hierarchy import GroupSizeSpec, Level, check_replicas_level, level_for_step, normalize_config
from .levels import delayed
from .levels.anchored import AnchoredLevels
from .levels.anchors import AnchoredLevel
from .levels.base import flat_buffers_needed
from .levels.plain import PlainLevel
from .levels.replicas import ReplicasLevel, TopLevel
from .levels.wire import WireBuffers, WireMean
from .outer import OuterOptimizerFactory
from .process_groups import release_at_exit
from .registry import register_step_keeper, step_keepers

logger = logging.getLogger(__name__)



class HierarchicalModelAverager(ModelAverager):
    r"""Average parameters over a hierarchy of process groups with different periods.

    Same constructor and stepping as
    :class:`torch.distributed.algorithms.model_averaging.hierarchical_model_averager.HierarchicalModelAverager`:
    each call to :meth:`average_parameters` averages, once ``step >= warmup_steps``,
    over the group of the largest period dividing ``step``, then increments ``step``.

    Differences: parameters are selected by ``requires_grad``, not by having a
    gradient (torch's rule; the same wherever every parameter has one); group
    sizes may be ``"local"`` (processes per node, from ``LOCAL_WORLD_SIZE``) or
    ``"world"``, so one configuration survives world-size changes;
    :meth:`state_dict` / :meth:`load_state_dict` carry the step across restarts;
    :meth:`rebuild` re-creates the subgroups for a new membership;
    :meth:`synchronize` averages over the whole world on demand; and parameters
    are kept as views of flat buffers, so averaging is one in-place all_reduce.

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
        sync_delays: period -> ``tau`` in ``[0, period)``, the calls its sync runs behind
            training (overlapped syncs; default 0, synchronous), e.g. ``{64: 2}``.

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
    4. ``params := anchor_L``; with ``sync_delays[L] = tau > 0``, 2-4 run in the background on a
       snapshot and complete ``tau`` calls later: ``params += anchor_L - snapshot`` (docs/averager.md).

    Whenever any level fires (anchored or not), every lower anchored level sets its anchor
    to the new parameters (a delayed sync's end: to anchor_L), its groups now in sync too. A
    level with neither option averages parameters exactly as torch does, with no
    extra memory. ``outer_optimizers={L: partial(torch.optim.SGD, lr=1.0)}``
    equals plain averaging. With one level, outer Nesterov SGD and one call to
    :meth:`average_parameters` before the first optimizer step (which starts the
    anchor at the initial parameters), the schedule and result are those of
    torchft's ``DiLoCo(sync_every=period)``. Memory: one extra copy of the
    parameters per anchored level, plus the outer optimizer's state and one
    shared pseudo-gradient buffer (and, for a comm dtype, wire buffers of the
    parameters' size in that dtype).

    Sharded parameters (FSDP2, HSDP, tensor parallel DTensors, ``Shard``/``Replicate``
    placements): each rank averages its local shards, kept in flat buffers, with the
    ranks of its level's block that hold the same slice in the other replicas; group
    sizes still count ranks, and each level must group whole replicas (a ``ValueError``
    on every rank otherwise; a level of single replicas warns once and does nothing).
    E.g. ``fully_shard(model, mesh=init_device_mesh("cuda", (world // 8, 8),
    mesh_dim_names=("replicate", "shard"))["shard"])`` with ``{16: "world"}``; see
    ``docs/averager.md``.

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
        ...     sync_delays={64: 2},  # the world's sync runs behind two training steps
        ... )
    """

    #: Elements per all_reduce on CPU; see :func:`elastic_hsgd.levels.plain.mean_in_place`.
    CPU_CHUNK_ELEMENTS = 1 << 22
    #: Elements per chunk of a compressed level's pipeline on CPU: smaller than the plain
    #: path's, so that less of the casts and sums sits before the first send or after the
    #: last receive.
    CPU_WIRE_CHUNK_ELEMENTS = 1 << 20

    @classmethod
    def instances(cls) -> list["HierarchicalModelAverager"]:
        """Averagers alive in this process (the checkpoint manager warns when a save leaves one out)."""
        return [keeper for keeper in step_keepers() if isinstance(keeper, cls)]

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
        sync_delays: Mapping[int, int] | None = None,
    ) -> None:
        config = normalize_config(period_group_size_dict)
        # Same config on every rank, so every rank raises here, before any collective.
        check_replicas_level(config, fault_tolerant=top_level is not None)
        factories, wire_dtypes, self._delays = outer.check_averager_options(
            [period for period, _ in config], outer_optimizers, comm_dtypes, sync_delays, top_level is not None, warmup_steps
        )
        top_period = config[-1][0]
        super().__init__(process_group)
        register_step_keeper(self)
        self._config = config
        self.top_level = top_level
        # Levels read the chunk sizes, the step and the top level from here at each call;
        # a weak proxy, so that they keep no reference cycle through the averager.
        owner = weakref.proxy(self)
        self._flat = FlatParameterBuffers()
        self._plain = PlainLevel(self._flat, owner)
        self._anchors = AnchoredLevels(
            # Levels keeping an anchor, lowest period first; none: torch's averaging, nothing more.
            [
                AnchoredLevel(period, factories.get(period), wire_dtypes.get(period))
                for period, _ in config
                # A delayed level keeps an anchor (fp32 wire, no outer optimizer unless given).
                if period in factories or period in wire_dtypes or period in self._delays
            ],
            anchor_device=anchor_device,
            # An outer optimizer on the "replicas" level: anchors start at a committed top-level sync.
            starts_at_top_sync=top_level is not None and (top_period in factories or top_period in self._delays),
            flat=self._flat,
            plain=self._plain,
            wire=WireMean(owner),
        )
        self._replicas = ReplicasLevel(owner, top_period, self._flat, self._anchors)
        self.warmup_steps = warmup_steps
        self._local_world_size = local_world_size
        self._owned_groups: list[dist.ProcessGroup] = []
        self._inputs = AveragingInputs()
        self._inputs_checked = False
        self._ddp_checked = False  # whether the first averaging step after warmup looked for a DDP without the hook
        self._slices = SliceGroups()  # the groups of DTensor parameters, made when first seen
        self._sharded = False  # whether the parameters of the current call are DTensors
        self._saved_layout: tuple[str, int] | None = None  # a loaded state's (shard layout, world), checked at the next call
        self._delay_groups: dict[int, dist.ProcessGroup] = {}  # each delayed level's own group, for its background reduction
        self.levels: tuple[Level, ...] = ()
        self._periods: tuple[int, ...] = ()
        self.period_process_group_dict: OrderedDict[int, dist.ProcessGroup] = OrderedDict()
        self.rebuild(process_group)
        release_at_exit(self.release_groups)

    @property
    def config(self) -> tuple[tuple[int, GroupSizeSpec], ...]:
        """The hierarchy as configured, ``(period, size spec)`` per level."""
        return self._config

    @property
    def world_size(self) -> int:
        """Size of the averager's whole process group."""
        return dist.get_world_size(self.process_group)

    def rebuild(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Re-create the subgroups for the current membership. Collective.

        Call it on every rank after the process group was re-initialised in
        process. Destroys the subgroups this averager made before, resolves
        ``"local"``/``"world"`` again, and raises ``ValueError`` on every rank
        (no rank hangs) if the hierarchy no longer fits the world.
        """
        delayed.settle(self._anchors, "the groups are rebuilt")  # its group is released below
        topology.release(self._owned_groups)
        self._slices.stale()  # DTensor parameters: their groups are made again at the next call
        # Lower levels' groups change with the membership: re-agree on anchors at the next call.
        self._anchors.membership_changed()
        overall = process_group if process_group is not None else dist.group.WORLD
        if overall is None:
            raise RuntimeError("torch.distributed is not initialised: call init_process_group() first.")
        self.process_group = overall
        local_world_size = topology.local_world_size(self._local_world_size)
        levels = topology.resolve_on_every_rank(self._config, overall, local_world_size)
        self.levels = levels
        self._periods = tuple(lv.period for lv in levels)
        self.period_process_group_dict = topology.new_level_groups(levels, overall, self._owned_groups)
        within = levels[:-1] if self.top_level is not None else levels  # "replicas" reduces through the top level
        self._delay_groups = delayed.dedicated_groups(within, self._delays, overall, self._owned_groups)
        topology.log_hierarchy(self._config, levels, overall, local_world_size, self.warmup_steps, logger)

    def release_groups(self) -> None:
        """Destroy the subgroups this averager made and forget its groups; it
        cannot average afterwards (call :meth:`rebuild` to use it again).
        Done at interpreter exit so gloo's threads are joined in time."""
        topology.release(self._owned_groups)
        self._slices.release()
        self.period_process_group_dict = OrderedDict()
        self.levels, self._periods = (), ()

    def average_parameters(self, params: Iterable[Any]) -> None:
        """Average ``model.parameters()`` or ``optimizer.param_groups`` if this step fires.

        Every parameter that requires a gradient is averaged, whether or not it
        has one now (``zero_grad(set_to_none=True)`` right after ``step()`` is fine).
        """
        index = level_for_step(self.step, self.warmup_steps, self._periods)
        warm = self.step >= self.warmup_steps
        anchors = self._anchors
        if index is not None or anchors.wants_start(warm) or not self._inputs_checked or anchors.in_flight is not None:
            # Checked at the first call even during warmup, so a wrong input fails early.
            flat, by_copy = self._split(params)
            if by_copy and anchors.levels:
                raise flat_buffers_needed(by_copy)
            if anchors.wants_start(warm):
                anchors.start(flat, self.process_group, self._group(self._periods[-1]))
            flight = anchors.in_flight
            if flight is not None and (index is not None or flight.completes_at <= self.step):
                self._complete_in_flight(flat, by_copy)  # before anything else, and before another level fires
            if index is not None and not self._ddp_checked:
                self._ddp_checked = True
                if not self._sharded:
                    ddp_hook_check.warn_if_ddp_without_hook(flat + by_copy, self.warmup_steps)
            if index is not None and self.top_level is not None and index == len(self.levels) - 1:
                top = self._periods[-1]
                self._replicas.fire(flat, by_copy, self.process_group, self._group(top), self._delays.get(top, 0))
                return
            if index is not None:
                self._sync_level(index, flat, by_copy)
        self.step += 1

    def _split(self, params: Iterable[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters to average (flat, by copy); for DTensors, their groups made first (collective, once)."""
        flat, by_copy = self._inputs.split(params)
        self._inputs_checked = True
        self._sharded = bool(flat) and is_dtensor(flat[0])
        if self._sharded:
            across = self._periods[-1] if self.top_level is not None else None
            if self._slices.ensure(flat, self.levels, self.process_group, across):
                self._anchors.cohort = self._slices.position
                averager_state.keeps_outer_state(self._saved_layout, self._slices.digest, self.world_size, self._anchors)
                self._saved_layout = None
        return flat, by_copy

    def _group(self, period: int) -> dist.ProcessGroup | None:
        """The group a level averages over; for DTensors this rank's slice group (``None``: nothing to average)."""
        if self._sharded:
            return self._slices.group(period)
        return self.period_process_group_dict[period]

    def _sync_level(self, index: int, flat: list[torch.Tensor], by_copy: list[torch.Tensor]) -> None:
        period = self.levels[index].period
        group = self._group(period)
        if group is None:
            return  # a single replica of a sharded model in each group: nothing to average (warned once)
        anchored = self._anchors.level(period)
        if anchored is None or not self._anchors.state.started:
            # Not started only below an anchored "replicas" level, until its first committed sync.
            self._plain.average(flat, by_copy, group)
        elif period in self._delays:  # lower anchors are reset when it completes
            own = group if self._sharded else self._delay_groups[period]  # slice groups: the averager's alone
            delayed.start(self._anchors, anchored, flat, own, self.step + self._delays[period])
            return
        else:
            self._anchors.sync(anchored, flat, group)
        self._anchors.reset_below(period, flat)

    def _complete_in_flight(self, flat: list[torch.Tensor], by_copy: list[torch.Tensor], top: bool = True) -> None:
        """Finish the overlapped sync in flight, if any (``top`` ``False``: unless it is the ``"replicas"`` level's)."""
        if self._anchors.in_flight is not None:
            self._replicas.complete(flat, by_copy, self.process_group, self._group(self._periods[-1]), top)

    def sync_top_level(self, params: Iterable[Any]) -> bool:
        """Run the top level's sync now, without stepping; ``True`` if committed.

        Fault-tolerant jobs call it to join (or leave) at a sync every replica
        group takes part in: at start, where a joining group heals, and at the end.
        It takes every parameter that requires a gradient, as every call does.
        """
        if self.top_level is None:
            raise RuntimeError("sync_top_level() needs a top_level (a 'replicas' hierarchy).")
        flat, by_copy = self._split(params)
        self._complete_in_flight(flat, by_copy, top=False)  # a "replicas" one completes in this sync
        return self._replicas.sync(flat, by_copy, self.process_group, self._group(self._periods[-1]))

    def synchronize(self, params: Iterable[Any]) -> bool:
        """Leave every rank with the mean of ``params`` over the whole world. Collective.

        The world is :attr:`process_group`, or with a ``top_level`` every rank of
        every replica group (through its ``average``). A plain mean, whatever the
        levels' outer optimizers and comm dtypes; every anchored level whose
        anchors have started takes the result as its anchor. :attr:`step` does
        not change, and no level fires. Returns ``True``, or with a top level
        whether the sync was committed (``False``: discarded, nothing changed).

        Call it on every rank before evaluating, exporting or saving the final
        model: between averaging points each rank holds its own replica.

        Example::

            >>> # xdoctest: +SKIP("needs torchrun")
            >>> for step in range(start, steps):
            ...     train_one_step()
            ...     averager.average_parameters(ddp.parameters())
            >>> averager.synchronize(ddp.parameters())   # every rank: the same parameters
            True
            >>> manager.save(steps, state)
        """
        flat, by_copy = self._split(params)
        anchors, world = self._anchors, self._group(self._periods[-1])
        if by_copy and anchors.levels:
            raise flat_buffers_needed(by_copy)
        if anchors.wants_start(self.step >= self.warmup_steps):
            anchors.start(flat, self.process_group, world)  # what the next call would do first: start or re-agree
        self._complete_in_flight(flat, by_copy)
        if self.top_level is not None:
            return self._replicas.mean(flat, by_copy, self.process_group, world)
        if world is not None:  # None: one replica of a sharded model, already the mean
            self._plain.average(flat, by_copy, world)
        if anchors.state.started:
            anchors.reset_below(self._periods[-1] + 1, flat)  # every anchored level: its groups are in sync too
        return True

    def state_dict(self) -> dict[str, Any]:
        """The step, warmup, the hierarchy configured and resolved: plain Python values.

        With anchored levels, also ``"outer"``: each level's options, its anchors
        (one flat tensor per parameter buffer) and its outer optimizer's
        ``state_dict()``, tensors included (live references, as torch's do).
        """
        state = averager_state.capture(self.step, self.warmup_steps, self._config, self.levels, self.world_size)
        if self._anchors.levels:
            state["outer"] = self._anchors.state_dict()
        if self._slices.active:
            state["shard_layout"] = self._slices.digest  # DTensor parameters: which slices this rank holds
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the step after checking the saved hierarchy matches this one.

        A world-size change since the save is fine where the configuration still
        resolves (e.g. ``"world"``); the top level must span the current world.
        """
        step = averager_state.check_saved(state_dict, self._config, self.warmup_steps)
        saved_layout = state_dict.get("shard_layout")
        if saved_layout is not None and self._slices.active:
            averager_state.refuse_other_layout(saved_layout, self._slices.digest)  # e.g. a heal from a group sharded otherwise
        world_size = self.world_size
        if self.levels[-1].group_size != world_size:
            raise ValueError(
                f"top level of the hierarchy spans {self.levels[-1].group_size} ranks but the "
                f"world has {world_size}: call rebuild() after the membership changed."
            )
        saved_world = int(state_dict["world_size"])
        # Another world size, or the same one in another node shape: lower anchors re-agree at the next call.
        groups_changed = averager_state.groups_changed(state_dict, self.levels, world_size)
        if groups_changed:
            logger.info(
                "averager resumes at step %d with world size %d -> %d, hierarchy %s -> %s", step, saved_world, world_size,
                [tuple(lv) for lv in state_dict.get("levels", [])], [(lv.period, lv.group_size) for lv in self.levels],
            )
        self._anchors.load_state_dict(state_dict.get("outer"), world_changed=groups_changed)
        # Not seen the parameters yet: compared with theirs at the next call (another layout drops the outer state).
        self._saved_layout = None if self._slices.active or saved_layout is None else (saved_layout, saved_world)
        self.step = step

    # -- what tests and benchmarks reach: the anchored levels' buffers -----------------

    @property
    def _anchored(self) -> list[AnchoredLevel]:
        return self._anchors.levels

    @property
    def _deltas(self) -> list[torch.Tensor]:
        return self._anchors.deltas

    @property
    def _wire(self) -> dict[tuple[Any, ...], WireBuffers]:
        return self._anchors.wire.buffers

    def _start_anchors(self, params: list[torch.Tensor]) -> None:
        self._anchors.start(params, self.process_group, self._group(self._periods[-1]))
