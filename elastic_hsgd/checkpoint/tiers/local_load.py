"""The local tier's reading side: what a node's folder holds, and one load plan carried out.

:func:`node_holdings` lists a node's committed local steps; every rank's list
is gathered and planned (:func:`~..local_plan.plan_load`, pure); then
:func:`execute_plan` reads, verifies and sends the copies the plan names.
A bad copy is reported, not raised, so the tier can plan again without it.

Example::

    >>> # xdoctest: +SKIP("needs a process group")
    >>> plan = plan_load(step, tier.nodes, survey, files_to_read)
    >>> bad, mine = execute_plan(plan, tier.storage, tier.rank, tier.nodes, tier._group, tier._all_gather)
    >>> bad or sorted(mine)   # the saved ranks this rank now holds verified bytes of
    [3]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ..commit import parse_commit_record, read_verified, verify_bytes
from ..layout import rank_file_name, step_dir_name
from ..local_plan import OWN, CopyKey, LoadPlan, StepHolding
from ..storage import CheckpointError, Storage
from .transfer import transfer_reads

logger = logging.getLogger(__name__)

#: The sub-folder of a local step that holds the copies kept for other ranks.
BUDDY_DIR = "buddy"


def node_holdings(storage: Storage) -> dict[int, StepHolding]:
    """What a node's folder holds: committed steps, whose own and buddy copies.

    An unreadable step is logged and left out.
    """
    held: dict[int, StepHolding] = {}
    for step in storage.committed_steps():
        step_dir = storage.path(step_dir_name(step))
        try:
            record = parse_commit_record(storage.read_file(storage.commit_path(step)))
            names = set(storage.list_names(step_dir))
            buddy_names = set(storage.list_names(f"{step_dir}/{BUDDY_DIR}"))
        except Exception as exc:  # noqa: BLE001 - an unreadable step is simply not offered
            logger.warning("local checkpoint step %d at %s is unreadable, skipping it: %r", step, storage.url, exc)
            continue
        ranks = range(record.world_size)
        held[step] = StepHolding(
            record,
            frozenset(r for r in ranks if rank_file_name(r, record.format) in names),
            frozenset(r for r in ranks if rank_file_name(r, record.format) in buddy_names),
        )
    return held


def execute_plan(
    plan: LoadPlan,
    storage: Storage,
    rank: int,
    nodes: list[int],
    group: dist.ProcessGroup | None,
    gather: Callable[[Any], list[Any]],
) -> tuple[set[CopyKey], dict[int, bytearray]]:
    """Read and verify what this rank holds for the plan, then send/receive across nodes. Collective.

    Returns every rank's bad copies (agreed through ``gather``) and, when
    there are none, this rank's verified bytes by saved rank.
    """
    step_dir = storage.path(step_dir_name(plan.step))
    mine: dict[int, bytearray] = {}
    outgoing = []
    bad: list[CopyKey] = []
    for index, read in enumerate(plan.reads):
        if read.holder != rank:
            continue
        entry = plan.record.file_for_rank(read.saved_rank)
        folder = step_dir if read.copy == OWN else f"{step_dir}/{BUDDY_DIR}"
        try:
            data = read_verified(storage, f"{folder}/{entry.name}", entry)
        except Exception as exc:  # noqa: BLE001 - reported collectively
            logger.warning("local %s copy %s of step %d on rank %d is unusable: %s", read.copy, entry.name, plan.step, rank, exc)
            bad.append((nodes[rank], plan.step, read.saved_rank, read.copy))
            continue
        if read.rank == rank:
            mine[read.saved_rank] = data
        else:
            outgoing.append((index, read, data))
    all_bad = {tuple(k) for b in gather(bad) for k in b}
    if all_bad:
        return all_bad, {}  # type: ignore[return-value]
    for read, data in transfer_reads(plan, rank, outgoing, group):
        entry = plan.record.file_for_rank(read.saved_rank)
        try:
            verify_bytes(data, entry)
            mine[read.saved_rank] = data
        except CheckpointError as exc:
            logger.warning("copy %s of step %d received from rank %d is unusable: %s", entry.name, plan.step, read.holder, exc)
            bad.append((nodes[read.holder], plan.step, read.saved_rank, read.copy))
    all_bad = {tuple(k) for b in gather(bad) for k in b}
    return all_bad, ({} if all_bad else mine)  # type: ignore[return-value]
