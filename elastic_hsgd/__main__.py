"""Command line::

    python -m elastic_hsgd ls URL [--verify]     committed steps (and whether each verifies)
    python -m elastic_hsgd inspect URL [--step N]  one commit record, averager state, hierarchy
    python -m elastic_hsgd verify URL [--step N]   every file of a step against its commit record

``ls`` and ``inspect`` read only commit records (JSON, size-capped; the counts
they claim are capped before use). Every command exits 1
with a message on stderr when the location does not exist or something does
not verify.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from .checkpoint.layout import CommitRecord, step_dir_name
from .checkpoint.storage import CheckpointError, Storage
from .checkpoint.verify import verify_step


def _records(storage: Storage) -> list[CommitRecord]:
    if not storage.fs.exists(storage.root):
        raise CheckpointError(f"{storage.url} does not exist (check the spelling, bucket and --storage-options)")
    records = []
    for step in storage.committed_steps():
        path = storage.commit_path(step)
        try:
            records.append(CommitRecord.from_json(json.loads(storage.read_file(path))))
        except (ValueError, OSError, RecursionError, CheckpointError) as exc:
            print(f"warning: unreadable commit record {path}: {exc}", file=sys.stderr)
    return records


def _ls(storage: Storage, verify: bool) -> int:
    records = _records(storage)
    if not records:
        print(f"no committed checkpoints at {storage.url}")
        return 0
    failed = 0
    print(f"{'step':>10} {'world':>6} {'bytes':>14}  {'saved (UTC)':<19}" + ("  verified" if verify else ""))
    for r in records:
        when = dt.datetime.fromtimestamp(r.unix_time, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{r.step:>10} {r.world_size:>6} {r.total_bytes:>14,}  {when:<19}"
        if verify:
            problems = verify_step(storage, r)
            failed += bool(problems)
            line += "  ok" if not problems else "  FAILED: " + "; ".join(problems)
        print(line)
    if failed:
        print(f"error: {failed} committed step(s) at {storage.url} do not verify", file=sys.stderr)
        return 1
    return 0


def _verify(storage: Storage, step: int | None) -> int:
    records = {r.step: r for r in _records(storage)}
    if step is not None and step not in records:
        print(f"error: step {step} is not committed at {storage.url}; committed: {sorted(records)}", file=sys.stderr)
        return 1
    if not records:
        print(f"error: no committed checkpoints at {storage.url}", file=sys.stderr)
        return 1
    failed = 0
    for s in [step] if step is not None else sorted(records):
        problems = verify_step(storage, records[s])
        if problems:
            failed += 1
            for problem in problems:
                print(f"step {s}: {problem}", file=sys.stderr)
        else:
            print(f"step {s}: ok ({len(records[s].files)} files, {records[s].total_bytes:,} bytes)")
    return 1 if failed else 0


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
    ls.add_argument("--verify", action="store_true", help="also check every file of every step (reads them all)")
    inspect = sub.add_parser("inspect", help="print a checkpoint's commit record, averager state and hierarchy")
    inspect.add_argument("url")
    inspect.add_argument("--step", type=int, default=None, help="default: the newest")
    verify = sub.add_parser("verify", help="check every file of a committed step: size, checksum, decodable")
    verify.add_argument("url")
    verify.add_argument("--step", type=int, default=None, help="default: every committed step")
    for p in (ls, inspect, verify):
        p.add_argument("--storage-options", default="{}", help="JSON object passed to fsspec, e.g. an endpoint_url")
    args = parser.parse_args(argv)
    try:
        storage = Storage(args.url, json.loads(args.storage_options))
        if args.command == "ls":
            return _ls(storage, args.verify)
        if args.command == "verify":
            return _verify(storage, args.step)
        return _inspect(storage, args.step)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
