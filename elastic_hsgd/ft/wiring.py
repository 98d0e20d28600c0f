"""torchft's Manager for one rank of a replica group, and joining/leaving the replicas level.

The Manager joins the group's TCPStore at ``MASTER_ADDR:MASTER_PORT`` as a
client, so call :func:`make_manager` after ``init_process_group`` (whose rank 0
hosts that store when torchrun's shared store is off, as restarts require).
Make it as late as possible, right before :func:`join`: from its creation the
group heartbeats to the lighthouse, and other groups' quorums wait (up to the
lighthouse's ``--join_timeout_ms``) for a heartbeating group that has not asked
to join yet.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..checkpoint.state import capture, restore
from .env import HOSTNAME_ENV, lighthouse_from_env
from .replicas import Heal, ReplicaGroups
from .transport import SafeHTTPTransport

logger = logging.getLogger(__name__)

STATE_KEY = "elastic_hsgd"


def make_manager(
    top: ReplicaGroups,
    state: MutableMapping[str, Any],
    replica_group: str,
    *,
    lighthouse: str | None = None,
    timeout: timedelta = timedelta(seconds=10),
    quorum_timeout: timedelta = timedelta(minutes=5),
    hostname: str | None = None,
) -> ReplicaGroups:
    """Give ``top`` (the averager's ``"replicas"`` level) this rank's torchft Manager.

    ``state`` is what a joiner receives: the same mapping the checkpoint
    manager saves (model, optimizer, averager, post-local-SGD counter, ...),
    captured with RNG, carried in the pickle-free checkpoint format.

    ``timeout`` bounds a cross-group collective with a lost group, the commit
    vote and a heal download; ``quorum_timeout`` how long a sync waits for the
    lighthouse to issue a quorum (a joiner waits for the others' next sync).

    ``lighthouse`` defaults to ``TORCHFT_LIGHTHOUSE``; ``hostname``, the name
    other groups reach this rank by for heals, to ``ELASTIC_HSGD_FT_HOSTNAME``
    (the pod IP in ``deploy/ft``), else this host's name. Returns ``top``.

    Example::

        >>> # xdoctest: +SKIP("needs torchft, a lighthouse and torchrun")
        >>> top = ReplicaGroups()
        >>> averager = HierarchicalModelAverager({2: "local", 8: "world", 32: "replicas"}, top_level=top)
        >>> state = {"model": model, "optimizer": opt, "averager": averager, "post_local_sgd": hook}
        >>> make_manager(top, state, replica_group="0", timeout=timedelta(seconds=10))
        >>> joined = join(averager, ddp.parameters(), top)   # right after: see the module docstring
    """
    from torchft import Manager
    from torchft.process_group import ProcessGroupGloo

    hostname = hostname or os.environ.get(HOSTNAME_ENV) or None
    transport = SafeHTTPTransport(timeout, hostname=hostname, replica_group=replica_group)

    def state_dict() -> dict[str, Any]:
        return capture(state)

    def load_state_dict(payload: dict[str, Any]) -> None:
        restore(state, payload, restore_rng=True)

    kwargs: dict[str, Any] = {} if hostname is None else {"hostname": hostname}
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=1,
        # Async: a healing group counts as not participating and contributes
        # zeros to the sync it heals in, instead of a duplicate of its source.
        use_async_quorum=True,
        timeout=timeout,
        quorum_timeout=quorum_timeout,
        connect_timeout=timeout,
        lighthouse_addr=lighthouse or lighthouse_from_env(),
        replica_id=replica_group,
        checkpoint_transport=transport,
        # Every group starts from the same seed (or the same checkpoint).
        init_sync=False,
        **kwargs,
    )
    manager.register_state_dict_fn(STATE_KEY, load_state_dict, state_dict)
    top.attach(manager, transport)
    return top


@dataclass(frozen=True)
class Joined:
    """What :func:`join` did.

    Attributes:
        step: the averager's step after joining (the peer's, if this group healed).
        heal: the :class:`~.replicas.Heal` this group went through, or ``None``
            when no live group was ahead (then resume from the durable checkpoint).
    """

    step: int
    heal: Heal | None


def sync_until_committed(averager: Any, params: Iterable[Any], top: ReplicaGroups) -> Heal | None:
    """One top-level sync outside the step schedule, repeated until it commits.

    Returns the heal it went through, if any (the peer's state, step included:
    the averager steps before a top-level sync, so a captured state always
    says where training resumes).

    Use it to end training on a cross-group sync, so every group finishes
    with the same parameters::

        >>> # xdoctest: +SKIP("needs torchft, a lighthouse and torchrun")
        >>> for step in range(start, steps):
        ...     train_one_step()
        ...     averager.average_parameters(ddp.parameters())
        >>> sync_until_committed(averager, ddp.parameters(), top)
    """
    params = list(params)
    heal = None
    while True:
        committed = averager.sync_top_level(params)
        heal = top.take_heal() or heal
        if committed:
            return heal
        logger.warning("top-level sync outside the schedule was discarded; trying again")


def join(averager: Any, params: Iterable[Any], top: ReplicaGroups) -> Joined:
    """Join the replica groups at their next sync. Collective within the group.

    If live groups are ahead, this group heals from one of them (no checkpoint
    read) and returns its new step with :class:`Heal`; otherwise everyone is
    starting and ``heal`` is ``None`` (resume from the durable checkpoint then).

    Call it right after :func:`make_manager`, before the first training step::

        >>> # xdoctest: +SKIP("needs torchft, a lighthouse and torchrun")
        >>> make_manager(top, state, replica_group="0")
        >>> joined = join(averager, ddp.parameters(), top)
        >>> if joined.heal is None:
        ...     start = resume(checkpoints, state, averager).step
        ... else:
        ...     start = joined.step
    """
    heal = sync_until_committed(averager, params, top)
    return Joined(averager.step, heal)
