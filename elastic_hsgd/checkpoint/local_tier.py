"""The node-local tier under its earlier module name: the tier is :mod:`.tiers.local`, its planning :mod:`.local_plan`.

Example::

    >>> from elastic_hsgd.checkpoint.local_tier import buddy_ranks
    >>> buddy_ranks([0, 1])
    [1, 0]
"""

from .local_plan import BUDDY, OWN, CopyKey, LoadPlan, NeededFn, Read, StepHolding, buddy_ranks, plan_load, record_digest
from .tiers.local import BUDDY_DIR, LocalTier, PeerLost, node_from_env

__all__ = [
    "BUDDY", "BUDDY_DIR", "OWN", "CopyKey", "LoadPlan", "LocalTier", "NeededFn", "PeerLost", "Read", "StepHolding",
    "buddy_ranks", "node_from_env", "plan_load", "record_digest",
]
