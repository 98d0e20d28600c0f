"""torchft's Manager for one rank of a replica group, and joining/leaving the replicas level.

The Manager joins the group's TCPStore at ``MASTER_ADDR:MASTER_PORT`` as a
client, so call :func:`make_manager` after ``init_process_group`` (whose rank 0
hosts that store when torchrun's shared store is off, as restarts require).
Make it as late as possible, right before :func:`join`: from its creation the
group heartbeats to the lighthouse, and other groups' quorums wait (up to the
lighthouse's ``--join_timeout_ms``) for a heartbeating group that has not asked
to join yet.

Fault-tolerant mode needs the heal secret every group shares
(``ELASTIC_HSGD_HEAL_SECRET`` or ``ELASTIC_HSGD_HEAL_SECRET_FILE``):
:func:`make_manager` refuses to start without it. Each group draws its own
random numbers (:mod:`.reseed`): after a heal, and after :func:`resume_group`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..averager_state import other_layout_in
from ..checkpoint.state import capture, restore
from .env import HOSTNAME_ENV, lighthouse_from_env
from .heal_client import HealRefused, ProofRefused
from .replicas import Heal, ReplicaGroups
from .reseed import reseed_replica_rank
from .transport import SafeHTTPTransport

logger = logging.getLogger(__name__)

STATE_KEY = "elastic_hsgd"
#: A heal payload may be this many times this rank's own state, plus :data:`HEAL_BYTES_SLACK`:
#: room for optimizer moments (Adam: 2x the model), anchors and outer-optimizer state per anchored
#: level, which a joiner may not have built yet.
HEAL_BYTES_FACTOR = 8
HEAL_BYTES_SLACK = 64 << 20


def heal_bytes_limit(state: MutableMapping[str, Any]) -> int:
    """The largest heal payload this rank accepts: :data:`HEAL_BYTES_FACTOR` x the tensor bytes of
    its own ``state`` (every group trains the same model) + :data:`HEAL_BYTES_SLACK`.

    Example::

        >>> model = torch.nn.Linear(10, 10)   # 440 bytes of parameters
        >>> heal_bytes_limit({"model": model}) == 8 * 440 + (64 << 20)
        True
    """
    return HEAL_BYTES_FACTOR * _tensor_bytes(capture(state, include_rng=False)) + HEAL_BYTES_SLACK


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _group_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _averager_step(state: MutableMapping[str, Any]) -> int | None:
    from ..averager import HierarchicalModelAverager

    return next((obj.step for obj in state.values() if isinstance(obj, HierarchicalModelAverager)), None)


def make_manager(
    top: ReplicaGroups,
    state: MutableMapping[str, Any],
    replica_group: str,
    *,
    lighthouse: str | None = None,
    timeout: timedelta = timedelta(seconds=10),
    quorum_timeout: timedelta = timedelta(minutes=5),
    hostname: str | None = None,
    seed: int | None = None,
    max_heal_bytes: int | None = None,
) -> ReplicaGroups:
    """Give ``top`` (the averager's ``"replicas"`` level) this rank's torchft Manager.

    ``state`` is what a joiner receives: the same mapping the checkpoint
    manager saves (model, optimizer, averager, post-local-SGD counter, ...),
    carried in the pickle-free checkpoint format; not the RNG state, since
    each group draws its own numbers.

    ``timeout`` bounds a cross-group collective with a lost group, the commit
    vote and a heal download; ``quorum_timeout`` how long a sync waits for the
    lighthouse to issue a quorum (a joiner waits for the others' next sync).

    ``lighthouse`` defaults to ``TORCHFT_LIGHTHOUSE``; ``hostname``, the name
    other groups reach this rank by for heals, to ``ELASTIC_HSGD_FT_HOSTNAME``
    (the pod IP in ``deploy/ft``), else this host's name. Returns ``top``.

    Heals are authenticated with the secret from ``ELASTIC_HSGD_HEAL_SECRET``
    or ``ELASTIC_HSGD_HEAL_SECRET_FILE``: without one this raises
    ``ValueError`` naming them, before torchft starts. A heal payload larger
    than ``max_heal_bytes`` is refused; the default is
    :func:`heal_bytes_limit` of ``state``. After a heal every rank is
    reseeded with ``replica_rank_seed(seed, healed step, replica_group, rank)``
    (:mod:`.reseed`), so no two groups share random streams; ``seed``
    defaults to ``torch.initial_seed()`` now (the script's ``torch.manual_seed``).

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
    limit = heal_bytes_limit(state) if max_heal_bytes is None else max_heal_bytes
    # First: without a heal secret (or with a bad one) nothing starts.
    transport = SafeHTTPTransport(timeout, hostname=hostname, replica_group=replica_group, max_bytes=limit)
    base_seed = torch.initial_seed() if seed is None else seed
    rank = _group_rank()

    def state_dict() -> dict[str, Any]:
        # Not the RNG state: with it, a joiner would repeat this group's random numbers.
        return capture(state, include_rng=False)

    def load_state_dict(payload: dict[str, Any]) -> None:
        load_heal(state, payload)
        step = _averager_step(state)
        reseed_replica_rank(base_seed, manager.current_step() if step is None else step, replica_group, rank, "healed")

    kwargs: dict[str, Any] = {} if hostname is None else {"hostname": hostname}
    try:
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
    except BaseException:
        transport.shutdown()  # its server thread and port would outlive the failed start
        raise
    manager.register_state_dict_fn(STATE_KEY, load_state_dict, state_dict)
    top.attach(manager, transport)
    logger.info("heal transport at %s, payloads up to %.1f MB", transport.metadata(), limit / 1e6)
    return top


def load_heal(state: MutableMapping[str, Any], payload: Mapping[str, Any]) -> None:
    """Load a peer's captured state into ``state``: what a heal does on each rank (not the RNG state).

    Rank ``r`` loads rank ``r``'s shards, so a payload from a group that shards
    the model otherwise (another ``"shard_layout"`` in its averager state) is
    refused with :class:`~.heal_client.HealRefused` before anything loads.

    >>> # xdoctest: +SKIP("needs the payload of a peer sharded otherwise")
    >>> load_heal(state, payload)
    Traceback (most recent call last):
    HealRefused: entry 'averager' was saved by a replica group that shards the model otherwise ...
    """
    misfit = other_layout_in(state, payload)
    if misfit is not None:
        raise HealRefused(misfit)
    restore(state, payload, restore_rng=False)


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
    says where training resumes). A heal that cannot succeed by trying again
    (the peer refused this rank's proof, or its reply failed the HMAC check,
    was over the size bound or in another format) raises that error instead.

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
        refused = _refused_heal(top)
        if refused is not None:
            # Another secret, a forged or oversized reply, another format: the next try would fail the same.
            logger.error("this replica group cannot heal from its peers: %s", refused)
            raise refused
        logger.warning("top-level sync outside the schedule was discarded; trying again")


def _refused_heal(top: ReplicaGroups) -> BaseException | None:
    """The error of the last discarded sync if it was a heal that retrying cannot fix."""
    errored = top.manager.errored() if top.manager is not None else None
    error = getattr(errored, "original_exception", errored)
    return error if isinstance(error, (HealRefused, ProofRefused)) else None


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


def resume_group(
    checkpoints: Any,
    state: dict[str, Any],
    averager: Any,
    *,
    replica_group: str | int,
    seed: int | None = None,
    strict: bool = True,
) -> Any:
    """:func:`elastic_hsgd.elastic.resume` for one replica group: load the newest durable checkpoint,
    then reseed every rank with ``replica_rank_seed(seed, step, replica_group, rank)`` (:mod:`.reseed`).

    Every group resumes from the one writer's files, so the RNG state they hold
    is the writer's: restored as is, rank ``r`` of every group would draw the
    same numbers. ``step`` is the step resumed at (0 on a fresh start);
    ``seed`` defaults to ``torch.initial_seed()``. Returns ``resume``'s
    :class:`~elastic_hsgd.elastic.Resumed`. Collective within the group.

    Example::

        >>> # xdoctest: +SKIP("needs a process group")
        >>> joined = join(averager, ddp.parameters(), top)
        >>> if joined.heal is None:
        ...     start = resume_group(checkpoints, state, averager, replica_group="0", seed=0).step
    """
    from ..elastic import resume

    base_seed = torch.initial_seed() if seed is None else seed
    resumed = resume(checkpoints, state, averager, strict=strict, reseed=False)
    why = "fresh start" if resumed.checkpoint is None else "resumed"
    reseed_replica_rank(base_seed, resumed.step, replica_group, _group_rank(), why)
    return resumed
