"""Which replica group this process belongs to, and the heal secret, from flags and the environment.

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


HEAL_SECRET_ENV = "ELASTIC_HSGD_HEAL_SECRET"
HEAL_SECRET_FILE_ENV = "ELASTIC_HSGD_HEAL_SECRET_FILE"
#: Shortest secret accepted (``openssl rand -hex 32`` gives 64 characters).
MIN_SECRET_BYTES = 16
#: Marks the placeholder value shipped in ``deploy/ft/heal-secret.yaml``; refused.
PLACEHOLDER_MARK = b"REPLACE-ME"
_HOW = f"e.g. {HEAL_SECRET_ENV}=$(openssl rand -hex 32), the same value in every replica group of the job"


def check_heal_secret(secret: bytes, source: str = "the heal secret") -> bytes:
    """``secret`` if it can authenticate heals: bytes, at least :data:`MIN_SECRET_BYTES`, not deploy/ft's placeholder.

    ``source`` names where it came from in the ``ValueError`` otherwise.

    Example::

        >>> check_heal_secret(b"0123456789abcdef0123")
        b'0123456789abcdef0123'
        >>> check_heal_secret(b"short", "ELASTIC_HSGD_HEAL_SECRET")
        Traceback (most recent call last):
        ...
        ValueError: ELASTIC_HSGD_HEAL_SECRET is 5 bytes; a heal secret needs at least 16: e.g. ELASTIC_HSGD_HEAL_SECRET=$(openssl rand -hex 32), the same value in every replica group of the job.
    """
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"{source} must be bytes, not {type(secret).__name__} (encode a str secret first).")
    if PLACEHOLDER_MARK in secret:
        raise ValueError(
            f"{source} still holds deploy/ft's placeholder: replace it in deploy/ft/heal-secret.yaml with a random "
            "value (openssl rand -hex 32), or create the Secret yourself: kubectl create secret generic "
            "digits-ft-heal --from-literal=heal-secret=$(openssl rand -hex 32)"
        )
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{source} is {len(secret)} bytes; a heal secret needs at least {MIN_SECRET_BYTES}: {_HOW}.")
    return bytes(secret)


def heal_secret_from_env() -> bytes:
    """The secret replica groups authenticate heals with: ``ELASTIC_HSGD_HEAL_SECRET``, or the
    contents of the file named by ``ELASTIC_HSGD_HEAL_SECRET_FILE`` (a Kubernetes Secret mount;
    surrounding whitespace, such as a final newline, is stripped).

    Raises ``ValueError`` naming both variables when neither (or both) is set,
    and when the value is too short or deploy/ft's placeholder; ``OSError`` if
    the file cannot be read.

    Example::

        >>> import os
        >>> os.environ["ELASTIC_HSGD_HEAL_SECRET"] = "4f1c0a5e9d3b7c2a8e6f1d0b"
        >>> heal_secret_from_env()
        b'4f1c0a5e9d3b7c2a8e6f1d0b'
        >>> del os.environ["ELASTIC_HSGD_HEAL_SECRET"]
    """
    value, path = os.environ.get(HEAL_SECRET_ENV), os.environ.get(HEAL_SECRET_FILE_ENV)
    if value and path:
        raise ValueError(
            f"both {HEAL_SECRET_ENV} and {HEAL_SECRET_FILE_ENV} are set: set only one, so every group surely uses the same secret."
        )
    if value:
        return check_heal_secret(value.encode(), HEAL_SECRET_ENV)
    if path:
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 16)
        except OSError as exc:
            raise OSError(f"{HEAL_SECRET_FILE_ENV}={path!r} cannot be read: {exc.strerror or exc}") from None
        return check_heal_secret(data.strip(), f"{HEAL_SECRET_FILE_ENV} ({path})")
    raise ValueError(
        f"fault-tolerant mode needs a heal secret, so that only this job's replica groups can fetch or feed a "
        f"rank's state: set {HEAL_SECRET_ENV}, or {HEAL_SECRET_FILE_ENV} to a file holding it ({_HOW})."
    )
