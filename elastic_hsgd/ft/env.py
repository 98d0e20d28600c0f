"""Which replica group this process belongs to, from flags and torchft's environment.

Importing this module does not import torchft.
"""

from __future__ import annotations

import os

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
REPLICA_GROUP_ENV = "REPLICA_GROUP_ID"
HOSTNAME_ENV = "ELASTIC_HSGD_FT_HOSTNAME"


def lighthouse_from_env() -> str | None:
    """The lighthouse address from ``TORCHFT_LIGHTHOUSE``, or ``None`` when unset or empty.

    torchft's own variable; set means: run as one replica group of a
    fault-tolerant job (e.g. ``http://lighthouse:29510``).

    Example::

        >>> import os
        >>> os.environ["TORCHFT_LIGHTHOUSE"] = "http://lighthouse:29510"
        >>> lighthouse_from_env()
        'http://lighthouse:29510'
        >>> os.environ["TORCHFT_LIGHTHOUSE"] = ""
        >>> lighthouse_from_env() is None
        True
    """
    return os.environ.get(LIGHTHOUSE_ENV) or None


def check_replica_group_id(value: str | int | None) -> str:
    """The replica group id normalised to a string; raises ``ValueError`` unless it is a non-negative int.

    torchft derives global ranks from its digits. ``value`` is typically the
    example's ``--replica-group-id`` flag, defaulting to ``REPLICA_GROUP_ID``.

    Example::

        >>> check_replica_group_id("007")
        '7'
        >>> check_replica_group_id(2)
        '2'
        >>> check_replica_group_id("a")
        Traceback (most recent call last):
        ...
        ValueError: replica group id 'a' is not a non-negative int: pass --replica-group-id N or set REPLICA_GROUP_ID=N, a different N for each replica group of the job.
    """
    if value is None or not str(value).isdigit():
        raise ValueError(
            f"replica group id {value!r} is not a non-negative int: pass --replica-group-id N or set "
            f"{REPLICA_GROUP_ENV}=N, a different N for each replica group of the job."
        )
    return str(int(value))
