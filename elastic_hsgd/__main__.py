"""Command line: ``python -m elastic_hsgd ls URL`` and ``python -m elastic_hsgd inspect URL [--step N]``.

Both read only commit records (JSON, size-capped; the counts they claim are
capped before use); no tensor file is opened.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from .checkpoint.layout import CommitRecord, step_dir_name
from .checkpoint.storage import CheckpointError, Storage


def _records(storage: Storage) -> list[CommitRecord]:
    records = []
    for step in storage.committed_steps():
        path = storage.commit_path(step)
        try:
            records.append(CommitRecord.from_json(json.loads(storage.read_file(path))))
        except (ValueError, OSError, RecursionError, CheckpointError) as exc:
            print(f"warning: unreadable commit record {path}: {exc}", file=sys.stderr)
    return records


def _ls(storage: Storage) -> int:
    records = _records(storage)
    if not records:
        print(f"no committed checkpoints at {storage.url}")
        return 0
    print(f"{'step':>10} {'world':>6} {'bytes':>14}  saved (UTC)")
    for r in records:
        when = dt.datetime.fromtimestamp(r.unix_time, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{r.step:>10} {r.world_size:>6} {r.total_bytes:>14,}  {when}")
    return 0


def _inspect(storage: Storage, step: int | None) -> int:
    records = {r.step: r for r in _records(storage)}
    if not records:
        print(f"no committed checkpoints at {storage.url}", file=sys.stderr)
        return 1
    if step is None:
        step = max(records)
    if step not in records:
        print(f"step {step} is not committed at {storage.url}; committed: {sorted(records)}", file=sys.stderr)
        return 1
    record = records[step]
    print(json.dumps({"url": storage.url, "dir": step_dir_name(step), **record.to_json()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elastic_hsgd", description="Inspect elastic_hsgd checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list committed checkpoints")
    ls.add_argument("url")
    inspect = sub.add_parser("inspect", help="print a checkpoint's commit record, averager state and hierarchy")
    inspect.add_argument("url")
    inspect.add_argument("--step", type=int, default=None, help="default: the newest")
    for p in (ls, inspect):
        p.add_argument("--storage-options", default="{}", help="JSON object passed to fsspec, e.g. an endpoint_url")
    args = parser.parse_args(argv)
    try:
        storage = Storage(args.url, json.loads(args.storage_options))
        if args.command == "ls":
            return _ls(storage)
        return _inspect(storage, args.step)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
