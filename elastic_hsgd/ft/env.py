"""Which replica group this process belongs to, from flags and torchft's environment.

Importing this module does not import torchft.
"""

from __future__ import annotations

import os

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
REPLICA_GROUP_ENV = "REPLICA_GROUP_ID"
HOSTNAME_ENV = "ELASTIC_HSGD_FT_HOSTNAME"


def lighthouse_from_env() -> str | None:
    """torchft's own variable; set means: run as one replica group of a fault-tolerant job."""
    return os.environ.get(LIGHTHOUSE_ENV) or None


def check_replica_group_id(value: str | int | None) -> str:
    """A replica group id is a non-negative int (torchft derives global ranks from its digits)."""
    if value is None or not str(value).isdigit():
        raise ValueError(
            f"replica group id {value!r} is not a non-negative int: pass --replica-group-id N or set "
            f"{REPLICA_GROUP_ENV}=N, a different N for each replica group of the job."
        )
    return str(int(value))
