"""Each replica group's own random streams: rank ``r`` of two groups never draws the same numbers.

A heal copies a peer's whole state, RNG included, and every group resumes from
the one writer's files; left so, rank ``r`` of every group would draw the same
dropout masks and the same RNG-driven batches. So in fault-tolerant mode each
rank is reseeded with :func:`replica_rank_seed` ``(seed, step, replica_group,
rank)`` from the step it (re)starts at: the step it healed to
(:func:`~.wiring.make_manager` does it) or the step it resumed at from the
durable checkpoint, 0 on a fresh start (:func:`~.wiring.resume_group`). The same
job then draws the same numbers on every run.

Example::

    >>> replica_rank_seed(0, 120, "1", 0) == replica_rank_seed(0, 120, "1", 0)
    True
    >>> replica_rank_seed(0, 120, "0", 0) != replica_rank_seed(0, 120, "1", 0)
    True
"""

from __future__ import annotations

import logging

from ..elastic import derived_seed, seed_rank

logger = logging.getLogger(__name__)

REPLICA_RANK_SEED_DOMAIN = "elastic_hsgd.replica_rank_seed"


def replica_rank_seed(seed: int, step: int, replica_group: str | int, rank: int) -> int:
    """The seed of ``rank`` of ``replica_group`` from ``step`` on: a pure function, in ``[0, 2**63)``.

    The first 8 bytes (big-endian) of
    ``sha256(f"elastic_hsgd.replica_rank_seed/{seed}/{step}/{replica_group}/{rank}".encode())``
    with the top bit cleared, as :func:`elastic_hsgd.elastic.rank_seed` does
    for one job (another domain: no group's streams repeat a plain job's).
    ``replica_group`` is normalised (``"007"`` is group 7); a non-numeric id is used as it is.
    """
    group = str(int(replica_group)) if str(replica_group).isdigit() else str(replica_group)
    if not group:
        raise ValueError("replica_rank_seed: replica_group is empty; pass the group's id (e.g. --replica-group-id).")
    return derived_seed("replica_rank_seed", REPLICA_RANK_SEED_DOMAIN, seed, step, rank, group)


def reseed_replica_rank(seed: int, step: int, replica_group: str | int, rank: int, why: str = "") -> int:
    """Seed torch (CPU, CUDA), Python's ``random`` and numpy's global RNG with :func:`replica_rank_seed`; returns the value."""
    value = replica_rank_seed(seed, step, replica_group, rank)
    seed_rank(value)
    logger.info(
        "reseeded rank %d of replica group %s: torch seed %d from (seed %d, step %d)%s",
        rank, replica_group, value, seed, step, f" ({why})" if why else "",
    )
    return value
