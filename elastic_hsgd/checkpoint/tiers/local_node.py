"""Which node a process of the local tier is on, and the deadline of the tier's collectives.

Buddy copies go to another node, so the tier must know each rank's node:
``ELASTIC_HSGD_NODE_RANK``, else torchrun's ``GROUP_RANK`` (one per agent),
else node 0 with a WARNING (buddy copies may then share a machine).

Example::

    >>> import os
    >>> os.environ["ELASTIC_HSGD_NODE_RANK"] = "3"
    >>> node_from_env()
    3
    >>> del os.environ["ELASTIC_HSGD_NODE_RANK"]
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: The environment variable that names this process's node for launchers other than torchrun.
NODE_ENV = "ELASTIC_HSGD_NODE_RANK"
_warned_no_node = False


def node_in_env() -> int | None:
    """The node named by ``ELASTIC_HSGD_NODE_RANK`` or ``GROUP_RANK``; ``None`` if neither is set."""
    for name in (NODE_ENV, "GROUP_RANK"):
        value = os.environ.get(name, "")
        if value:
            if not value.isdigit():
                raise ValueError(f"{name}={value!r} must be a non-negative int: the index of this process's node.")
            return int(value)
    return None


def node_from_env() -> int:
    """This process's node: ``ELASTIC_HSGD_NODE_RANK``, else torchrun's ``GROUP_RANK`` (one per agent), else 0."""
    node = node_in_env()
    return 0 if node is None else node


def warn_node_unknown(ranks: list[int]) -> None:
    """Once per process: ``ranks`` have no node id, so every rank is taken to be on node 0."""
    global _warned_no_node
    if _warned_no_node:
        return
    _warned_no_node = True
    logger.warning(
        "local checkpoint tier: rank(s) %s have no node id (neither GROUP_RANK, set by torchrun, nor %s), so every "
        "rank is taken to be on node 0 and buddy copies may land on the same machine, where losing it loses both. "
        "Pass CheckpointManager(..., node=<this node's index>) or set %s.", ranks[:8], NODE_ENV, NODE_ENV,
    )


def collective_timeout(timeout: timedelta) -> timedelta:
    """``timeout``, or the job's own collective timeout (the default group's) where that is shorter.

    The tier's collectives run beside training's; one whose peer is gone must
    fail as soon as training's would, or the worker outlives the failure (a
    stuck save thread) and torchelastic notices the lost node late.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return timeout
    try:
        group = dist.distributed_c10d._get_default_group()
        device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
        job = group._get_backend(device).options._timeout
    except Exception:  # noqa: BLE001 - private API: keep the given timeout if it changed
        return timeout
    return min(timeout, job) if isinstance(job, timedelta) and job > timedelta(0) else timeout
