"""The ``"replicas"`` top level: averaging across replica groups through torchft.

Each replica group is an ordinary torchrun job. At a top-level sync every rank
of a group takes part; across groups only ranks of the same group rank talk
(torchft's Manager builds that process group per quorum), and each carries one
shard of the model:

1. reduce-scatter inside the group: rank ``r`` holds shard ``r`` of the group's average;
2. the shard is averaged across the groups in the quorum (fault tolerant: a lost
   group makes the sync fail instead of hang);
3. ``should_commit``: every group agrees to keep the result, or all ranks of a
   group discard it and keep their parameters;
4. all-gather inside the group.

So a rank sends ``model bytes / group size`` across groups per sync. A joining
group heals inside step 1's quorum: it receives a live peer's whole training
state and contributes nothing to that sync, then takes the average like everyone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heal:
    """A heal this group went through: whose state, how big, how long (fetch, decode, load)."""

    source_replica: str
    seconds: float
    bytes: int


class ReplicaGroups:
    """Top level of :class:`~elastic_hsgd.HierarchicalModelAverager` across torchft replica groups
    (a :class:`~elastic_hsgd.levels.replicas.TopLevel`).

    Built empty, because torchft's Manager needs the training state, which holds
    the averager, which holds this; :func:`elastic_hsgd.ft.wiring.make_manager`
    attaches the Manager (``use_async_quorum=True``, so a healing group sits out
    the sync it heals in) and its checkpoint transport.

    Example::

        >>> # xdoctest: +SKIP("needs torchrun, a lighthouse and torchft")
        >>> top = ReplicaGroups()
        >>> averager = HierarchicalModelAverager({2: "local", 8: "world", 32: "replicas"}, top_level=top)
        >>> state = {"model": model, "optimizer": opt, "averager": averager}
        >>> make_manager(top, state, replica_group="0")
        >>> join(averager, model.parameters(), top)   # heals if other groups are ahead
    """

    def __init__(self) -> None:
        self.manager: Any = None
        self.transport: Any = None
        self.cross_group_bytes_last_sync = 0
        self.model_bytes = 0
        self._members: tuple[int, ...] = ()
        self._participants: int | None = None
        self._events: list[dict[str, Any]] = []
        self.last_heal: Heal | None = None

    def attach(self, manager: Any, transport: Any) -> None:
        """Use ``manager`` (torchft's Manager) and its checkpoint ``transport`` from now on."""
        self.manager, self.transport = manager, transport

    def average(self, flats: list[torch.Tensor], group: dist.ProcessGroup, step: int) -> bool:
        """Average ``flats`` in place across the replica groups in the quorum; ``True`` if committed.

        The averager's :class:`~elastic_hsgd.levels.replicas.TopLevel` contract:
        ``group`` is this replica group, ``step`` the averager's (already
        stepped). ``False``: the sync was discarded and ``flats`` are unchanged.
        """
        manager = self.manager
        if manager is None:
            raise RuntimeError("the replicas level has no torchft Manager yet: call elastic_hsgd.ft.make_manager first.")
        self.transport.last_received = None
        manager.start_quorum()
        # Peers capture this rank's state for a joiner in the quorum thread:
        # let that finish before the buffers below change.
        manager.wait_quorum()
        healing = bool(getattr(manager, "_healing", False))
        size = dist.get_world_size(group)
        # The replica group's size (the default group's): with sharded parameters `group` is only
        # the ranks holding this rank's slice, while torchft numbers ranks by the whole group.
        self._note_quorum(step, dist.get_world_size())

        staged = []
        works = []
        cross_bytes = 0
        for flat in flats:
            per_rank = math.ceil(flat.numel() / size)
            padded = flat.new_zeros(per_rank * size)
            padded[: flat.numel()].copy_(flat)
            shard = flat.new_empty(per_rank)
            dist.reduce_scatter_tensor(shard, padded, group=group)
            shard.div_(size)
            works.append(manager.allreduce(shard))  # ReduceOp.AVG over the groups taking part
            cross_bytes += shard.numel() * shard.element_size()
            staged.append((flat, padded, shard))
        for work in works:
            work.wait()
        # Applies a pending heal (the peer's state) before agreeing to commit.
        commit_started = time.perf_counter()
        committed = bool(manager.should_commit())
        commit_seconds = time.perf_counter() - commit_started
        self.cross_group_bytes_last_sync = cross_bytes
        self.model_bytes = sum(f.numel() * f.element_size() for f in flats)
        if committed:
            with torch.no_grad():
                for flat, padded, shard in staged:
                    dist.all_gather_into_tensor(padded, shard, group=group)
                    flat.copy_(padded[: flat.numel()])
        else:
            logger.warning("top-level sync at step %d discarded (%s)", step, manager.errored())
        received = self.transport.last_received
        if healing and received is not None:
            # should_commit loaded it, committed or not: this group now holds the peer's state.
            self.last_heal = Heal(received.source_replica_group, received.seconds + commit_seconds, received.bytes)
        return committed

    def _note_quorum(self, step: int, group_size: int) -> None:
        # torchft 0.2.0 keeps the quorum's members only as the global ranks it
        # configured its process group with: replica id digits x group size + group rank.
        ranks = getattr(getattr(self.manager, "_pg", None), "_global_ranks", None) or []
        members = tuple(sorted({r // group_size for r in ranks}))
        participants = self.manager.num_participants()
        if (members, participants) != (self._members, self._participants):
            self._events.append({"event": "quorum", "step": step, "replicas": participants})
            logger.info("quorum at step %d: replica groups %s, %d taking part", step, list(members), participants)
        self._members, self._participants = members, participants

    def take_events(self) -> list[dict[str, Any]]:
        """Events since the last call: ``quorum`` whenever the number of groups taking part changed."""
        events, self._events = self._events, []
        return events

    def take_heal(self) -> Heal | None:
        """The heal of the last sync, once; ``None`` if it did not heal."""
        heal, self.last_heal = self.last_heal, None
        return heal

    def is_checkpoint_writer(self) -> bool:
        """Whether this group writes the durable checkpoint: the first group of the last quorum.

        Every group holds the same parameters right after a committed sync, so
        one writer is enough; all ranks of a group get the same answer.
        """
        return self.manager.participating_rank() == 0
