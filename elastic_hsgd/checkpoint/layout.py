"""What a checkpoint looks like on storage, as pure functions.

::

    <url>/step_000000001200/rank_00000.safetensors    one file per rank: its own state
    <url>/step_000000001200/rank_00001.safetensors
    <url>/step_000000001200/COMMIT.json               written last; without it the step does not exist

The step label is the number of optimizer steps done when the state was
captured: a run resumed from label ``n`` continues with step ``n``.

Local SGD leaves ranks with different parameters between averaging points, so
each rank saves its own model, optimizer and RNG state; exact resume needs all
of them. ``COMMIT.json`` records every file's size and checksum, the world size,
and a summary of small entries (e.g. the averager's state), so a reader can
verify before loading and ``inspect`` needs no tensor file. Checkpoints of
version 0.1 (record format 1, ``rank_*.ehsgd`` files) are still read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 2
#: Record formats this version reads: 1 is elastic_hsgd 0.1 (``.ehsgd`` rank files).
READABLE_FORMATS = {1: ".ehsgd", 2: ".safetensors"}
COMMIT_NAME = "COMMIT.json"
#: In a committed step folder: a load of an older step left this step behind (hidden from readers, deleted at the next save).
ABANDONED_NAME = "ABANDONED"
#: At the cloud root: the run's identity, created once (exclusively) on the first save or load.
RUN_ID_NAME = "RUN_ID"
#: What a commit record may claim; a tampered record must not make a reader loop or allocate without bound.
MAX_WORLD_SIZE = 1 << 20
MAX_FILE_BYTES = 1 << 44
MAX_COMMIT_BYTES = 256 << 20
_STEP_DIR = re.compile(r"^step_(\d{12})$")
_RANK_FILE = re.compile(r"^rank_(\d{5,})(?:\.([0-9a-f]{8}))?(\.[a-z]+)$")
_TAG = re.compile(r"^[0-9a-f]{8}$")


def step_dir_name(step: int) -> str:
    """The folder of checkpoint ``step``, e.g. ``step_000000000042``; ``ValueError`` for a bad step.

    >>> step_dir_name(42)
    'step_000000000042'
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**12:
        raise ValueError(f"checkpoint step {step!r} must be an int in [0, 10**12).")
    return f"step_{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a directory name such as ``step_000000000042``, else ``None``."""
    match = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def rank_file_name(rank: int, record_format: int = FORMAT_VERSION, tag: str | None = None) -> str:
    """The file of ``rank`` in a step folder of record format ``record_format``.

    ``tag`` (8 hex digits) names a re-save's files, written beside the committed
    ones until its commit record replaces theirs.

    >>> rank_file_name(3), rank_file_name(3, 1), rank_file_name(3, tag="0a1b2c3d")
    ('rank_00003.safetensors', 'rank_00003.ehsgd', 'rank_00003.0a1b2c3d.safetensors')
    """
    if tag is not None and not _TAG.match(tag):
        raise ValueError(f"rank file tag {tag!r} must be 8 lowercase hex digits.")
    return f"rank_{rank:05d}{'' if tag is None else '.' + tag}{READABLE_FORMATS[record_format]}"


def rank_file_tag(name: str) -> str | None:
    """The re-save tag of a rank file name, ``None`` for a first save's file.

    >>> rank_file_tag("rank_00003.0a1b2c3d.safetensors"), rank_file_tag("rank_00003.safetensors")
    ('0a1b2c3d', None)
    """
    match = _RANK_FILE.match(name)
    return match.group(2) if match else None


def saved_ranks_to_read(rank: int, world_size: int, saved_world_size: int) -> list[int]:
    """Which saved ranks' files ``rank`` reads when resuming.

    Same world size: its own (exact resume). Different world size: every new
    rank gets the mean of all saved replicas, and reads a share of them, saved
    ranks ``rank, rank + world_size, ...``; the shares cover each saved rank
    once. A rank with an empty share (the world grew) contributes nothing to
    the sum and reads saved rank ``rank % saved_world_size`` for the state's
    structure only (see :func:`structure_rank`).

    >>> saved_ranks_to_read(1, 2, 4), saved_ranks_to_read(3, 4, 2)
    ([1, 3], [])
    """
    for name, value in (("rank", rank), ("world_size", world_size), ("saved_world_size", saved_world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative int.")
    if not 0 <= rank < world_size or saved_world_size == 0:
        raise ValueError(f"rank {rank} of world {world_size} cannot read a checkpoint of world {saved_world_size}.")
    if world_size == saved_world_size:
        return [rank]
    return list(range(rank, saved_world_size, world_size))


def structure_rank(rank: int, world_size: int, saved_world_size: int) -> int:
    """The saved rank whose file gives ``rank`` the state's structure and non-floating values."""
    share = saved_ranks_to_read(rank, world_size, saved_world_size)
    return share[0] if share else rank % saved_world_size


def files_to_read(rank: int, world_size: int, saved_world_size: int) -> list[int]:
    """Every saved rank whose file ``rank`` opens when resuming: its share
    (:func:`saved_ranks_to_read`) or, when that is empty, its :func:`structure_rank`.

    >>> files_to_read(1, 2, 4), files_to_read(3, 4, 2)
    ([1, 3], [1])
    """
    return saved_ranks_to_read(rank, world_size, saved_world_size) or [structure_rank(rank, world_size, saved_world_size)]


@dataclass(frozen=True)
class FileEntry:
    """One rank file of a committed step, as its commit record gives it: name, checksum, size in bytes."""

    name: str
    checksum: str
    bytes: int


@dataclass(frozen=True)
class CommitRecord:
    """A committed step: its files and a summary of the state (plain JSON).

    ``entries`` maps each saved entry name to a summary of its state
    (``state_dict`` with tensors shown as ``"tensor(float32, [3, 4])"``) where
    that is small, so ``inspect`` shows the averager's step and hierarchy
    without opening a tensor file.
    """

    step: int
    world_size: int
    files: tuple[FileEntry, ...]
    unix_time: float
    entries: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None
    format: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        """The size of all the step's rank files."""
        return sum(f.bytes for f in self.files)

    def file_for_rank(self, rank: int) -> FileEntry:
        """The entry of saved rank ``rank``'s file; ``ValueError`` if the record has none."""
        name = rank_file_name(rank, self.format, rank_file_tag(self.files[0].name) if self.files else None)
        for entry in self.files:
            if entry.name == name:
                return entry
        raise ValueError(f"checkpoint of step {self.step} has no file {name}.")

    def to_json(self) -> dict[str, Any]:
        """The record as the plain JSON object written to ``COMMIT.json`` (read back by :meth:`from_json`)."""
        return {
            "format": self.format,
            "step": self.step,
            "world_size": self.world_size,
            "unix_time": self.unix_time,
            "files": [{"name": f.name, "checksum": f.checksum, "bytes": f.bytes} for f in self.files],
            "entries": self.entries,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: Any) -> "CommitRecord":
        """Parse and check a commit record; ``ValueError`` names what is wrong.

        Every count is checked against its cap before anything is built from it.
        """
        if not isinstance(data, dict):
            raise ValueError(f"commit record is a {type(data).__name__}, not an object.")
        record_format = data.get("format")
        if record_format not in READABLE_FORMATS:
            raise ValueError(f"commit record format {record_format!r} is not one of {sorted(READABLE_FORMATS)}.")
        try:
            world_size = data["world_size"]
            if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size <= MAX_WORLD_SIZE:
                raise ValueError(f"world_size {str(world_size)[:40]} is not an int in [1, {MAX_WORLD_SIZE}]")
            if not isinstance(data["files"], list) or len(data["files"]) != world_size:
                raise ValueError(f"files is not a list of world_size={world_size} entries")
            files = tuple(FileEntry(str(f["name"]), str(f["checksum"]), int(f["bytes"])) for f in data["files"])
            if any(not 0 <= f.bytes <= MAX_FILE_BYTES for f in files):
                raise ValueError(f"a file claims a size outside [0, {MAX_FILE_BYTES}]")
            record = cls(
                step=int(data["step"]),
                world_size=world_size,
                files=files,
                unix_time=float(data["unix_time"]),
                # Format 1 kept the averager's state under its own key.
                entries=data.get("entries") if record_format != 1 else {"averager": data.get("averager")},
                extra=data.get("extra"),
                format=record_format,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"commit record is malformed: {exc!r}") from exc
        step_dir_name(record.step)
        # One version of the step: every file has the first one's tag (a re-save's) or none.
        tag = rank_file_tag(files[0].name) if record_format == FORMAT_VERSION else None
        expected = sorted(rank_file_name(r, record_format, tag) for r in range(record.world_size))
        if sorted(f.name for f in files) != expected:
            shown = [f.name for f in files[:8]]
            raise ValueError(f"commit record of step {record.step} lists files {shown}..., expected {expected[:8]}...")
        return record


def plan_retention(
    committed: list[int],
    uncommitted: list[int],
    keep: int,
    just_committed: int,
    previous: int | None = None,
    *,
    abandoned: Collection[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Which step directories to delete after committing ``just_committed``.

    ``abandoned`` are the committed steps of a timeline the run left: those
    that were newer than the step it loaded *when it loaded* (it fell back past
    a corrupt newest step, or loaded an older step on purpose), and its own
    saves newer than this one. The rule:

    - The step just committed is never deleted.
    - Abandoned steps are deleted: a restart must not go back to them.
    - Of the other committed steps, which are ordinary whoever wrote them
      (another torchft writer's steps committed after this run loaded), the
      newest ``keep`` (counting the one just committed) are kept.
    - Uncommitted directories other than the one just committed are leftovers
      of crashed saves (saves are serialized) and are deleted.

    Without ``abandoned``, the single-writer shorthand: the committed steps
    newer than ``just_committed``, and those between ``previous`` (the step
    this run last loaded or saved; ``None`` on a fresh start) and it, are the
    abandoned ones.

    >>> plan_retention([100, 150, 160, 200], [100, 150, 160, 200], keep=3, just_committed=160, previous=150)
    ([200], [])
    >>> plan_retention([500, 525, 550, 575, 600], [], keep=3, just_committed=600, abandoned=())
    ([500, 525], [])
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be at least 1.")
    done = set(committed) | {just_committed}
    if abandoned is None:
        abandoned = {s for s in done if s > just_committed or (previous is not None and previous < s < just_committed)}
    superseded = (set(abandoned) & done) - {just_committed}
    ordinary = sorted(done - superseded, reverse=True)
    kept = set(ordinary[:keep]) | {just_committed}
    drop_committed = sorted(done - kept)
    drop_partial = sorted(s for s in set(uncommitted) - done)
    return drop_committed, drop_partial


def summarize(value: Any, max_items: int = 64) -> Any:
    """``value`` as plain JSON, tensors shown as ``"tensor(float32, [3, 4])"``; for commit records."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"tensor({str(value.dtype).removeprefix('torch.')}, {list(value.shape)})"
    if isinstance(value, dict):
        return {str(k): summarize(v, max_items) for k, v in list(value.items())[:max_items]}
    if isinstance(value, (list, tuple)):
        return [summarize(v, max_items) for v in value[:max_items]]
    return type(value).__name__


def small_summaries(payload: dict[str, Any], names: list[str], limit: int = 16384) -> dict[str, Any]:
    """The :func:`summarize` of each entry in ``names`` whose JSON is at most ``limit`` characters,
    for a commit record's ``entries`` (e.g. the averager's step and hierarchy, for ``inspect``).

    >>> small_summaries({"step": 3, "big": list(range(10000))}, ["step", "big"], limit=100)
    {'step': 3}
    """
    out = {}
    for name in names:
        summary = summarize(payload[name])
        if len(json.dumps(summary)) <= limit:
            out[name] = summary
    return out
