"""One local save's work in the save thread: the rank's own file, the buddy copy, the commit.

Every rank writes its file, sends its bytes to its buddy (and writes the copies
it keeps for others), then one gather of every rank's report checks that each
copy's checksum matches its writer's; only then does each node's lowest rank
write its folder's commit record and apply retention, and a second gather tells
every rank that every node committed. A storage failure anywhere is reported
by every rank (a :class:`~..storage.CheckpointError`); a failed collective
raises whatever the collective raised (the tier then stops the worker).

Example::

    >>> # xdoctest: +SKIP("needs a LocalTier")
    >>> write_copy_commit(tier, 105, blob, entries, extra)
    >>> tier.committed_step
    105
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..commit import apply_retention, write_commit_record
from ..layout import CommitRecord, FileEntry, rank_file_name, step_dir_name
from ..storage import CheckpointError
from .local_load import BUDDY_DIR
from .transfer import exchange_with_buddy

logger = logging.getLogger(__name__)


def write_copy_commit(tier: Any, step: int, blob: bytearray, entries: dict | None, extra: dict | None) -> None:
    """Write ``blob`` as ``tier``'s rank file of ``step``, copy it to the buddy, commit. Collective over the tier's group.

    ``tier`` is a :class:`~.local.LocalTier`; its ``committed_step`` is set once every node committed.
    """
    started = time.perf_counter()
    storage = tier.storage
    step_dir = storage.path(step_dir_name(step))
    name = rank_file_name(tier.rank)
    own: tuple[str, str, int] | None = None
    held: dict[int, str] = {}
    error = None
    try:
        # A step redone after a roll-back: its old commit must not vouch for the new files.
        storage.rm_file(storage.commit_path(step))
        digest, nbytes = storage.write_file(f"{step_dir}/{name}", [blob])
        own = (name, digest, nbytes)
    except Exception as exc:  # noqa: BLE001 - every rank must reach the exchange and gather below
        error = f"writing {name}: {exc!r}"
    received = exchange_with_buddy(blob, tier.buddies, tier.rank, tier._group)
    for sender, data in received.items():
        try:
            held[sender] = storage.write_file(f"{step_dir}/{BUDDY_DIR}/{rank_file_name(sender)}", [data])[0]
        except Exception as exc:  # noqa: BLE001
            error = f"writing the copy of rank {sender}: {exc!r}"
    reports = tier._all_gather((own, held, error))
    problems = [f"rank {r}: {e}" for r, (_, _, e) in enumerate(reports) if e]
    for holder, (_, holder_held, _) in enumerate(reports):
        for sender, digest in holder_held.items():
            sent = reports[sender][0]
            if sent is not None and sent[1] != digest:
                problems.append(f"rank {holder}'s copy of rank {sender} has checksum {digest}, rank {sender} wrote {sent[1]}")
    commit_error = None
    if not problems and tier.node_lead:
        record = CommitRecord(
            step=step, world_size=tier.world_size, files=tuple(FileEntry(*o) for o, _, _ in reports),
            unix_time=time.time(), entries=entries, extra={**(extra or {}), "tier": "local"},
        )
        try:
            write_commit_record(storage, record)
            apply_retention(storage, tier.keep, step, what="local retention", log_deletions=False)
        except Exception as exc:  # noqa: BLE001
            commit_error = f"committing in {tier.url}: {exc!r}"
    commit_errors = tier._all_gather(commit_error)
    problems += [f"rank {r}: {e}" for r, e in enumerate(commit_errors) if e]
    if problems:
        raise CheckpointError(f"local checkpoint of step {step} not committed: " + "; ".join(problems[:4]))
    tier.committed_step = step
    if tier.rank == 0:
        logger.info("local checkpoint step %d committed: %.1f MB per rank, %.3f s", step, len(blob) / 1e6, time.perf_counter() - started)
