"""Whether a due local save goes ahead: every rank's report, one verdict, the same on every rank.

The local tier never makes training wait. A save due while this rank's
previous one is still running is not staged; the rank still queues the step
(with no bytes) behind its running save, so every rank's save thread meets
every due step, in order. There each rank reports what it has for the step
(:data:`Report`), one all_gather shares the reports, and :func:`verdict`
(pure) decides for all: a step some rank could not stage is skipped by every
rank, and so is a step that would not fit some node's folder (a memory-backed
``emptyDir`` over its ``sizeLimit`` gets the pod evicted). No rank ever waits
for another's previous save: a rank whose save finished queues the step
behind nothing, and its thread waits in the all_gather, not training.

Example::

    >>> nodes, buddies = [0, 1], [1, 0]
    >>> verdict([(5, 100, None, None), (5, 100, None, None)], nodes, buddies, limit=None) is None
    True
    >>> verdict([(5, 100, None, None), (5, None, None, None)], nodes, buddies, limit=None)
    ('busy', 'the previous local save was still running on rank(s) [1]')
    >>> verdict([(5, 100, 150, None), (5, 100, None, None)], nodes, buddies, limit=None)[0]
    'space'
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

import torch
from fsspec.implementations.local import LocalFileSystem

from ..storage import Storage

#: What a rank reports before a local save: (step, bytes it staged or ``None`` if it
#: skipped, free bytes at its node folder, bytes its node folder holds; ``None``: not measured).
Report = tuple[int, int | None, int | None, int | None]


def verdict(reports: Sequence[Report], nodes: Sequence[int], buddies: Sequence[int | None], limit: int | None) -> tuple[str, str] | None:
    """``None`` if the save goes ahead, else ``(kind, why)``: kind ``"busy"``, ``"space"`` or ``"mismatch"``."""
    steps = sorted({report[0] for report in reports})
    if len(steps) > 1:
        return "mismatch", f"ranks were saving different steps {steps[:4]}: every rank must save the same steps"
    busy = [rank for rank, report in enumerate(reports) if report[1] is None]
    if busy:
        return "busy", f"the previous local save was still running on rank(s) {busy[:8]}"
    problems = space_problems(reports, nodes, buddies, limit)
    if problems:
        return "space", "; ".join(problems)
    return None


def encode_report(report: Report, cpu_s: float, wall_s: float, step_s: float | None) -> torch.Tensor:
    """One rank's :data:`Report` and its timings (:mod:`.local_cadence`) as one float64 tensor (``-1``: ``None``),
    so that a single all_gather of fixed size shares them (no pickling, one collective)."""
    values = [*report, cpu_s, wall_s, step_s]
    return torch.tensor([-1.0 if v is None else float(v) for v in values], dtype=torch.float64)


def decode_reports(gathered: Sequence[torch.Tensor]) -> tuple[list[Report], float, float, float | None]:
    """Every rank's report, the most CPU any rank spent, and rank 0's wall time and step time.

    >>> decode_reports([encode_report((5, 100, None, None), 0.002, 0.1, 0.007), encode_report((5, None, 9, None), 0.003, 0.2, None)])
    ([(5, 100, None, None), (5, None, 9, None)], 0.003, 0.1, 0.007)
    """
    rows = [t.tolist() for t in gathered]
    reports = [tuple(None if v < 0 else int(v) for v in row[:4]) for row in rows]
    step_s = rows[0][6]
    return reports, max(row[4] for row in rows), rows[0][5], None if step_s < 0 else step_s  # type: ignore[return-value]


def node_needs(sizes: Sequence[int], nodes: Sequence[int], buddies: Sequence[int | None]) -> dict[int, int]:
    """Bytes each node's folder receives for one step: its ranks' own files and the buddy copies it keeps."""
    need = dict.fromkeys(nodes, 0)
    for rank, size in enumerate(sizes):
        need[nodes[rank]] += size
        buddy = buddies[rank]
        if buddy is not None:
            need[nodes[buddy]] += size
    return need


def space_problems(reports: Sequence[Report], nodes: Sequence[int], buddies: Sequence[int | None], limit: int | None) -> list[str]:
    """Each node folder the step would not fit: over ``limit`` (``local_size_limit``), or over its free space.

    The folder keeps its committed steps until the new one commits, so what
    it holds now counts against the limit.
    """
    need = node_needs([report[1] or 0 for report in reports], nodes, buddies)
    problems = []
    for node in sorted(need):
        ranks = [rank for rank, n in enumerate(nodes) if n == node]
        free = [reports[r][2] for r in ranks if reports[r][2] is not None]
        held = [reports[r][3] for r in ranks if reports[r][3] is not None]
        if limit is not None and held and max(held) + need[node] > limit:
            problems.append(
                f"node {node}'s folder would hold {max(held) + need[node]} bytes ({max(held)} held + {need[node]} for "
                f"this step), over local_size_limit={limit}"
            )
        if free and need[node] > min(free):
            problems.append(f"node {node} needs {need[node]} bytes for this step, {min(free)} are free at its folder")
    return problems


def free_bytes(storage: Storage) -> int | None:
    """Free bytes on the filesystem of a local folder; ``None`` for other filesystems (not known)."""
    if not isinstance(storage.fs, LocalFileSystem):
        return None
    try:
        return int(shutil.disk_usage(storage.root).free)
    except OSError:
        return None


def held_bytes(storage: Storage) -> int | None:
    """The bytes of every file in the folder; ``None`` if it cannot be listed."""
    try:
        return int(storage.fs.du(storage.root, total=True))
    except Exception:  # noqa: BLE001 - not measured: the limit is not checked this time
        return None
