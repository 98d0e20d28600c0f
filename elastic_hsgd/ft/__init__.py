"""Fault tolerance across replica groups on torchft (from a clone: ``pip install -e .[ft]``).

- :mod:`.replicas`: :class:`ReplicaGroups`, the ``"replicas"`` top level of the averager.
- :mod:`.transport`: :class:`SafeHTTPTransport`, a pickle-free, authenticated torchft
  ``CheckpointTransport`` (:mod:`.heal_auth` its proofs, :mod:`.heal_server` and
  :mod:`.heal_client` its two ends).
- :mod:`.wiring`: torchft's Manager for a torchrun worker; joining, healing, resuming a group.
- :mod:`.reseed`: each group's own random streams after a heal or a resume.
- :mod:`.env`: the replica group id and the heal secret (``ELASTIC_HSGD_HEAL_SECRET`` or
  ``ELASTIC_HSGD_HEAL_SECRET_FILE``, required) from the environment.

Nothing here is imported by the rest of the package: without torchft installed
(or without ``TORCHFT_LIGHTHOUSE`` set) nothing changes.

The names above are importable from here; torchft is imported on first use::

    >>> # xdoctest: +SKIP("needs torchft, a lighthouse and torchrun")
    >>> from elastic_hsgd import HierarchicalModelAverager
    >>> from elastic_hsgd.ft import ReplicaGroups, join, make_manager, resume_group, sync_until_committed
    >>> top = ReplicaGroups()
    >>> averager = HierarchicalModelAverager({2: "local", 8: "world", 32: "replicas"}, warmup_steps=20, top_level=top)
    >>> make_manager(top, state, replica_group="0", seed=0)  # needs TORCHFT_LIGHTHOUSE and the heal secret
    >>> joined = join(averager, ddp.parameters(), top)  # joined.heal: None unless healed from a peer
    >>> if joined.heal is None:
    ...     start = resume_group(checkpoints, state, averager, replica_group="0", seed=0).step

See ``docs/fault-tolerance.md`` for the whole job.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ReplicaGroups", "SafeHTTPTransport", "make_manager", "join", "sync_until_committed", "resume_group",
    "replica_rank_seed",
]

_WHERE = {
    "ReplicaGroups": ".replicas",
    "SafeHTTPTransport": ".transport",
    "make_manager": ".wiring",
    "join": ".wiring",
    "sync_until_committed": ".wiring",
    "resume_group": ".wiring",
    "replica_rank_seed": ".reseed",
}


def __getattr__(name: str) -> Any:
    """Import one of ``__all__`` from its submodule on first access."""
    # Lazy, so importing elastic_hsgd.ft does not need torchft until it is used.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(name)
