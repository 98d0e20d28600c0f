"""What a checkpoint looks like on storage, as pure functions.

::

    <url>/step_000000001200/rank_00000.ehsgd    one file per rank: its own state
    <url>/step_000000001200/rank_00001.ehsgd
    <url>/step_000000001200/COMMIT.json      written last; without it the step does not exist

Local SGD leaves ranks with different parameters between averaging points, so
each rank saves its own model, optimizer and RNG state; exact resume needs all
of them. ``COMMIT.json`` records every file's size and checksum, the world size,
and the averager's state (plain JSON), so a reader can verify before loading
and ``inspect`` needs no tensor file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 1
COMMIT_NAME = "COMMIT.json"
_STEP_DIR = re.compile(r"^step_(\d{12})$")


def step_dir_name(step: int) -> str:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**12:
        raise ValueError(f"checkpoint step {step!r} must be an int in [0, 10**12).")
    return f"step_{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a directory name such as ``step_000000000042``, else ``None``."""
    match = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.ehsgd"


def source_rank(rank: int, saved_world_size: int) -> int:
    """Which saved rank's state a rank loads.

    Same world size: its own (exact resume). Different world size: rank
    ``rank % saved_world_size``, a complete replica (parameters, optimizer
    state) of one saved rank; the averager's next averaging step makes the new
    groups consistent again.
    """
    if saved_world_size <= 0:
        raise ValueError(f"saved world size {saved_world_size} must be positive.")
    return rank % saved_world_size


@dataclass(frozen=True)
class FileEntry:
    name: str
    checksum: str
    bytes: int


@dataclass(frozen=True)
class CommitRecord:
    step: int
    world_size: int
    files: tuple[FileEntry, ...]
    unix_time: float
    averager: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def file_for_rank(self, rank: int) -> FileEntry:
        name = rank_file_name(rank)
        for entry in self.files:
            if entry.name == name:
                return entry
        raise ValueError(f"checkpoint of step {self.step} has no file {name}.")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "unix_time": self.unix_time,
            "files": [{"name": f.name, "checksum": f.checksum, "bytes": f.bytes} for f in self.files],
            "averager": self.averager,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: Any) -> "CommitRecord":
        """Parse and check a commit record; ``ValueError`` names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"commit record is a {type(data).__name__}, not an object.")
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"commit record format {data.get('format')!r} is not {FORMAT_VERSION}.")
        try:
            files = tuple(FileEntry(str(f["name"]), str(f["checksum"]), int(f["bytes"])) for f in data["files"])
            record = cls(
                step=int(data["step"]),
                world_size=int(data["world_size"]),
                files=files,
                unix_time=float(data["unix_time"]),
                averager=data.get("averager"),
                extra=data.get("extra"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"commit record is malformed: {exc!r}") from exc
        expected = sorted(rank_file_name(r) for r in range(record.world_size))
        if sorted(f.name for f in files) != expected:
            raise ValueError(f"commit record of step {record.step} lists files {[f.name for f in files]}, expected {expected}.")
        return record


def plan_retention(committed: list[int], uncommitted: list[int], keep: int, just_committed: int) -> tuple[list[int], list[int]]:
    """Which step directories to delete after committing ``just_committed``.

    Keeps the newest ``keep`` committed steps. Deletes uncommitted directories
    only below the step just committed: saves are serialized, so those are
    leftovers of a save that crashed, never one still being written.
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be at least 1.")
    newest_first = sorted(set(committed), reverse=True)
    drop_committed = sorted(newest_first[keep:])
    drop_partial = sorted(s for s in set(uncommitted) - set(committed) if s < just_committed)
    return drop_committed, drop_partial
