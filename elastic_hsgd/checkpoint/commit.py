"""What every tier does the same way with a committed step: write its commit record, read its files
verified against it, and delete steps (retention) record first.

A step exists for readers only once its ``COMMIT.json`` is there, so the
record is written last and atomically, and deleted first: a half-deleted step
is never "committed". A file is used only if its size and checksum are the
record's and the safe decoder accepts it; anything else is :class:`Unusable`,
and a reader falls back past it.

Example::

    >>> import time
    >>> from .layout import FileEntry
    >>> storage = Storage("memory://commit-example")
    >>> name, (checksum, size) = "rank_00000.safetensors", storage.write_file(storage.path("step_000000000001", "rank_00000.safetensors"), [b"abc"])
    >>> write_commit_record(storage, CommitRecord(1, 1, (FileEntry(name, checksum, size),), time.time()))
    >>> bytes(read_verified(storage, storage.path("step_000000000001", name), FileEntry(name, checksum, size)))
    b'abc'
    >>> storage.committed_steps()
    [1]
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from .layout import ABANDONED_NAME, COMMIT_NAME, CommitRecord, FileEntry, plan_retention, step_dir_name
from .state import deserialize
from .storage import CheckpointError, Storage, checksum_of

logger = logging.getLogger(__name__)


class Unusable(CheckpointError):
    """A checkpoint that does not verify (missing, truncated, corrupt, refused): fall back past it."""


def write_commit_record(storage: Storage, record: CommitRecord) -> None:
    """Commit ``record.step``: its record appears whole or not at all (see :meth:`.Storage.write_atomic`)."""
    storage.write_atomic(storage.commit_path(record.step), json.dumps(record.to_json(), indent=1).encode())


def parse_commit_record(raw: bytes) -> CommitRecord:
    """A commit record's bytes, parsed and checked; ``ValueError`` (or ``RecursionError``) if malformed."""
    return CommitRecord.from_json(json.loads(raw))


def read_verified(storage: Storage, path: str, entry: FileEntry) -> bytearray:
    """The bytes of ``path``, checked against ``entry`` (size first, so an overlong file is never read).

    Raises :class:`Unusable` for a missing, truncated, overlong or corrupt file.
    """
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise Unusable(f"{entry.name} is missing") from None
    _check_size(size, entry)
    buffer, checksum = storage.read_into(path, entry.bytes)
    if checksum != entry.checksum:
        raise Unusable(f"{entry.name} is corrupt: its checksum differs from the commit record")
    return buffer


def verify_bytes(data: bytearray, entry: FileEntry) -> None:
    """Check bytes received from elsewhere (a peer) against ``entry``; :class:`Unusable` if they differ."""
    _check_size(len(data), entry)
    if checksum_of(data) != entry.checksum:
        raise Unusable(f"{entry.name} is corrupt: its checksum differs from the commit record")


def _check_size(size: int, entry: FileEntry) -> None:
    if size != entry.bytes:
        state = "truncated" if size < entry.bytes else "longer than recorded"
        raise Unusable(f"{entry.name} is {state}: {size} bytes, commit record says {entry.bytes}")


def decode(data: bytearray, label: str) -> dict[str, Any]:
    """Verified bytes as a payload; :class:`Unusable` naming ``label`` if the safe decoder refuses them."""
    try:
        return deserialize(data)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a refusal
        raise Unusable(f"{label} was refused by the safe loader: {exc}") from exc


def remove_step(storage: Storage, step: int, *, committed: bool = True) -> None:
    """Delete step ``step``'s folder, its commit record first (if ``committed``)."""
    if committed:
        storage.rm_file(storage.commit_path(step))
    storage.remove_tree(storage.path(step_dir_name(step)))


def step_listing(storage: Storage) -> tuple[list[int], set[int]]:
    """Every committed step, abandoned ones included, and which of them are marked abandoned."""
    committed, marked = [], set()
    for step in storage.step_dirs():
        names = storage.list_names(storage.path(step_dir_name(step)))
        if COMMIT_NAME in names:
            committed.append(step)
            if ABANDONED_NAME in names:
                marked.add(step)
    return committed, marked


def mark_abandoned(storage: Storage, steps: Iterable[int], loaded: int | None) -> None:
    """Hide ``steps`` from readers: the run loaded ``loaded``, an older step (``None``: none), and left them behind.

    The next save's retention deletes them; loading one of them explicitly
    first brings it back (:func:`unmark_abandoned`).
    """
    note = json.dumps({"loaded": loaded, "unix_time": time.time()}).encode()
    for step in steps:
        storage.write_atomic(storage.path(step_dir_name(step), ABANDONED_NAME), note)


def unmark_abandoned(storage: Storage, up_to: int) -> None:
    """Un-hide the abandoned steps up to ``up_to``: a run loaded ``up_to``, so they are its past again."""
    for step in sorted(step_listing(storage)[1]):
        if step <= up_to:
            storage.rm_file(storage.path(step_dir_name(step), ABANDONED_NAME))


def remove_unreferenced(storage: Storage, record: CommitRecord) -> None:
    """After a re-save committed ``record``: delete its folder's other files (the replaced version's)."""
    keep = {COMMIT_NAME, *(f.name for f in record.files)}
    step_dir = storage.path(step_dir_name(record.step))
    for name in storage.list_names(step_dir):
        if name not in keep:
            storage.rm_file(f"{step_dir}/{name}")


def apply_retention(
    storage: Storage,
    keep: int,
    just_committed: int,
    previous: int | None = None,
    *,
    what: str = "retention",
    log_deletions: bool = True,
    abandoned: Iterable[int] | None = None,
) -> None:
    """Delete what :func:`~.layout.plan_retention` says after committing ``just_committed``.

    With ``abandoned`` (the cloud tier), the steps marked abandoned on storage
    are abandoned too; without it, the single-writer rule of ``previous``.
    Never raises: a failure is logged (as "could not apply ``what``"), since
    retention must never fail a committed save.
    """
    try:
        if abandoned is None:
            drop_committed, drop_partial = plan_retention(storage.committed_steps(), storage.step_dirs(), keep, just_committed, previous)
        else:
            committed, marked = step_listing(storage)
            drop_committed, drop_partial = plan_retention(
                committed, storage.step_dirs(), keep, just_committed, abandoned=set(abandoned) | marked
            )
        for step in drop_committed + drop_partial:
            remove_step(storage, step, committed=step in drop_committed)
            if log_deletions:
                logger.info("deleted %s checkpoint step %d", "partial" if step in drop_partial else "committed", step)
    except Exception as exc:  # noqa: BLE001 - retention must never fail a committed save
        logger.warning("could not apply %s (keep=%d) at %s: %r", what, keep, storage.url, exc)
