"""Check a committed step against its commit record, file by file, as a reader would."""

from __future__ import annotations

from .layout import CommitRecord, step_dir_name
from .state import deserialize
from .storage import Storage


def verify_step(storage: Storage, record: CommitRecord) -> list[str]:
    """Every problem with the files of ``record``'s step; empty when all verify.

    Each file must exist, have the size and checksum its commit record gives,
    and be accepted by the safe decoder. Sizes are checked before reading, so
    a file much larger than recorded is never read.
    """
    problems = []
    step_dir = storage.path(step_dir_name(record.step))
    for entry in record.files:
        path = f"{step_dir}/{entry.name}"
        try:
            size = storage.size(path)
        except FileNotFoundError:
            problems.append(f"{entry.name}: missing")
            continue
        except OSError as exc:
            problems.append(f"{entry.name}: cannot stat ({exc!r})")
            continue
        if size != entry.bytes:
            problems.append(f"{entry.name}: {size} bytes, commit record says {entry.bytes}")
            continue
        try:
            data, checksum = storage.read_into(path, entry.bytes)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            problems.append(f"{entry.name}: unreadable ({exc!r})")
            continue
        if checksum != entry.checksum:
            problems.append(f"{entry.name}: checksum {checksum} differs from the commit record's {entry.checksum}")
            continue
        try:
            deserialize(data)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{entry.name}: refused by the safe decoder: {exc}")
    return problems
