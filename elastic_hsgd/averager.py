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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging.averagers import ModelAverager

from .flat_params import AveragingInputs, FlatParameterBuffers, average_by_copy
from .process_groups import agree, release_at_exit, release_group
from .hierarchy import (
    GroupSizeSpec,
    Level,
    contiguous_blocks,
    level_for_step,
    normalize_config,
    repeated_group_sizes,
    resolve_levels,
)

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


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
        local_world_size: size used for ``"local"``; default ``LOCAL_WORLD_SIZE``.

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
    """

    #: Elements per all_reduce on CPU; see :meth:`_average`.
    CPU_CHUNK_ELEMENTS = 1 << 22

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
        local_world_size: int | None = None,
    ) -> None:
        super().__init__(process_group)
        HierarchicalModelAverager._instances.add(self)
        self._config = normalize_config(period_group_size_dict)
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
        if index is not None or not self._inputs_checked:
            # Checked at the first call even during warmup, so a wrong input fails early.
            flat, by_copy = self._inputs.split(params)
            self._inputs_checked = True
        if index is not None:
            group = self.period_process_group_dict[self.levels[index].period]
            if by_copy:
                average_by_copy(by_copy, group)
            self._average(flat, group)
        self.step += 1

    def _average(self, params: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        if not params:
            return
        buffers = self._flat.buffers_for(params)
        if buffers is None:
            average_by_copy(params, group)
            return
        size = dist.get_world_size(group)
        pending = []
        with torch.no_grad():
            for flat in buffers:
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

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values: the step, warmup, the hierarchy configured and resolved."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "warmup_steps": self.warmup_steps,
            "config": [[period, spec] for period, spec in self._config],
            "levels": [[lv.period, lv.group_size] for lv in self.levels],
            "world_size": self.world_size,
        }

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
        self.step = step
