"""Fault tolerance across replica groups on torchft (``pip install elastic_hsgd[ft]``).

- :mod:`.replicas`: :class:`ReplicaGroups`, the ``"replicas"`` top level of the averager.
- :mod:`.transport`: :class:`SafeHTTPTransport`, a pickle-free torchft ``CheckpointTransport``.
- :mod:`.wiring`: torchft's Manager for a torchrun worker; joining and healing.

Nothing here is imported by the rest of the package: without torchft installed
(or without ``TORCHFT_LIGHTHOUSE`` set) nothing changes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ReplicaGroups", "SafeHTTPTransport", "make_manager", "join", "sync_until_committed"]

_WHERE = {
    "ReplicaGroups": ".replicas",
    "SafeHTTPTransport": ".transport",
    "make_manager": ".wiring",
    "join": ".wiring",
    "sync_until_committed": ".wiring",
}


def __getattr__(name: str) -> Any:
    # Lazy, so importing elastic_hsgd.ft does not need torchft until it is used.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(name)
