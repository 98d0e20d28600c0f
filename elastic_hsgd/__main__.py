"""Command line::

    python -m elastic_hsgd ls URL [--verify]          committed steps (and whether each verifies)
    python -m elastic_hsgd inspect URL [--step N] [--full]
                                                      a step's entries (tensor counts and bytes), the
                                                      averager's step and hierarchy; --full: the whole
                                                      commit record
    python -m elastic_hsgd verify URL [--step N]      every file of a step against its commit record
    python -m elastic_hsgd export URL [--step N] [--rank R] [--entry NAME] OUT.safetensors
                                                      the model as one safetensors file: the mean of the
                                                      saved replicas, or rank R's

Every command takes ``--storage-options JSON`` (fsspec options, e.g. an
``endpoint_url``). ``ls`` reads commit records only; ``inspect`` also reads
rank 0's header (for sharded state: each tensor's global shape, mesh and
placements); ``export`` reads one tensor at a time
(:mod:`elastic_hsgd.checkpoint.export`). Every failure is one line on stderr
beginning with ``error:``, and the exit status is 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from .checkpoint.export import export_model
from .checkpoint.layout import CommitRecord, parse_step_dir, step_dir_name
from .checkpoint.rank_index import rank_file, read_index
from .checkpoint.sharded_export import describe_layouts
from .checkpoint.storage import CheckpointError, Storage
from .checkpoint.verify import verify_step

#: Averager state shown by ``inspect`` (its ``state_dict`` keys).
_AVERAGER_KEYS = ("step", "warmup_steps", "config", "levels", "world_size")


def _error(message: str) -> None:
    print("error: " + " ".join(str(message).splitlines()), file=sys.stderr)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _storage(url: str, options_text: str) -> Storage:
    try:
        options = json.loads(options_text)
    except ValueError as exc:
        raise CheckpointError(f"--storage-options is not valid JSON ({exc}): {options_text!r}") from None
    if not isinstance(options, dict):
        raise CheckpointError(
            f"--storage-options must be a JSON object, e.g. '{{\"client_kwargs\": {{\"endpoint_url\": \"http://host:9000\"}}}}', "
            f"not a {type(options).__name__}: {options_text!r}"
        )
    try:
        return Storage(url, options)
    except Exception as exc:  # noqa: BLE001 - unknown protocol, a missing package, a rejected option
        raise CheckpointError(f"cannot open {url} with --storage-options {options_text}: {type(exc).__name__}: {_reason(exc)}") from None


def _check_root(storage: Storage) -> None:
    """The root exists, answers, and is a run's folder rather than one of its step folders."""
    try:
        exists = storage.fs.exists(storage.root)
    except TypeError as exc:  # the filesystem's client refused an option only when first used
        raise CheckpointError(f"{storage.url}: --storage-options were refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - botocore and friends raise their own types
        raise CheckpointError(f"{storage.url} is not reachable: {_reason(exc)} (check the endpoint and credentials in --storage-options)") from None
    if not exists:
        raise CheckpointError(f"{storage.url} does not exist (check the spelling, bucket and --storage-options)")
    name = storage.root.rstrip("/").rsplit("/", 1)[-1]
    if parse_step_dir(name) is not None and not storage.step_dirs():
        parent = storage.url.rstrip("/").rsplit("/", 1)[0]
        raise CheckpointError(f"{storage.url} is the folder of one step ({name}); pass the run's folder, its parent: {parent}")


def _records(storage: Storage) -> list[CommitRecord]:
    _check_root(storage)
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
        line = f"{r.step:>10} {r.world_size:>6} {r.total_bytes:>14,}  {_when(r):<19}"
        if verify:
            problems = verify_step(storage, r)
            failed += bool(problems)
            line += "  ok" if not problems else "  FAILED: " + "; ".join(problems)
        print(line)
    if failed:
        _error(f"{failed} committed step(s) at {storage.url} do not verify")
        return 1
    return 0


def _when(record: CommitRecord) -> str:
    return dt.datetime.fromtimestamp(record.unix_time, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _pick(storage: Storage, step: int | None) -> CommitRecord:
    records = {r.step: r for r in _records(storage)}
    if not records:
        raise CheckpointError(f"no committed checkpoints at {storage.url}")
    if step is not None and step not in records:
        raise CheckpointError(f"step {step} is not committed at {storage.url}; committed: {sorted(records)}")
    return records[max(records) if step is None else step]


def _verify(storage: Storage, step: int | None) -> int:
    records = [_pick(storage, step)] if step is not None else sorted(_records(storage), key=lambda r: r.step)
    if not records:
        raise CheckpointError(f"no committed checkpoints at {storage.url}")
    failed = 0
    for record in records:
        problems = verify_step(storage, record)
        failed += bool(problems)
        for problem in problems:
            _error(f"step {record.step}: {problem}")
        if not problems:
            print(f"step {record.step}: ok ({len(record.files)} files, {record.total_bytes:,} bytes)")
    return 1 if failed else 0


def _summary(storage: Storage, record: CommitRecord) -> dict[str, Any]:
    """Per entry: tensor count and bytes (rank 0's file), the averager's state, small plain values."""
    counts: dict[str, dict[str, int]] = {}
    try:
        path, size = rank_file(storage, record, 0)
        index = read_index(storage, path, size, record.format)
        for name, node in index.entries().items():
            refs = index.refs(node)
            counts[name] = {"tensors": len(refs), "bytes": sum(index.tensors[r].nbytes for r in refs)} if refs else {}
        for name, layout in describe_layouts(index).items():  # DTensor state: global shapes, mesh and placements
            counts.setdefault(name, {}).update(layout)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"warning: tensor counts left out: {exc}", file=sys.stderr)
    summaries = record.entries or {}
    entries = {}
    for name in [*counts, *(n for n, v in summaries.items() if n not in counts and v is not None)]:
        item: dict[str, Any] = dict(counts.get(name, {}))
        summary = summaries.get(name)
        if isinstance(summary, dict) and "step" in summary and "levels" in summary:  # the averager
            item.update({key: summary[key] for key in _AVERAGER_KEYS if key in summary})
            if isinstance(summary.get("outer"), dict) and "levels" in summary["outer"]:
                item["outer_levels"] = summary["outer"]["levels"]  # [period, wire dtype, has an outer optimizer]
        elif summary is not None and "tensor(" not in json.dumps(summary) and len(json.dumps(summary)) <= 200:
            item["value"] = summary
        entries[name] = item
    return {
        "url": storage.url,
        "dir": step_dir_name(record.step),
        "step": record.step,
        "world_size": record.world_size,
        "saved_utc": _when(record),
        "files": len(record.files),
        "bytes": record.total_bytes,
        "entries": entries,
        "note": "tensors and bytes per entry are rank 0's; --full prints the whole commit record",
    }


def _inspect(storage: Storage, step: int | None, full: bool) -> int:
    record = _pick(storage, step)
    shown = {"url": storage.url, "dir": step_dir_name(record.step), **record.to_json()} if full else _summary(storage, record)
    print(json.dumps(shown, indent=2))
    return 0


def _export(storage: Storage, args: argparse.Namespace) -> int:
    _check_root(storage)
    done = export_model(storage, args.out, step=args.step, rank=args.rank, entry=args.entry)
    source = f"saved rank {done.replicas[0]}'s replica" if args.rank is not None else f"the mean of {len(done.replicas)} saved replicas"
    print(f"wrote {done.path}: {done.tensors} tensors, {done.bytes:,} bytes, {source} of step {done.step} (entry {done.entry!r})")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m elastic_hsgd", description="Inspect and export elastic_hsgd checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list committed checkpoints")
    ls.add_argument("url")
    ls.add_argument("--verify", action="store_true", help="also check every file of every step (reads them all)")
    inspect = sub.add_parser("inspect", help="summarize a checkpoint: entries, tensor counts and bytes, averager state")
    inspect.add_argument("url")
    inspect.add_argument("--step", type=int, default=None, help="default: the newest")
    inspect.add_argument("--full", action="store_true", help="print the whole commit record")
    verify = sub.add_parser("verify", help="check every file of a committed step: size, checksum, decodable")
    verify.add_argument("url")
    verify.add_argument("--step", type=int, default=None, help="default: every committed step")
    export = sub.add_parser("export", help="write the model as one safetensors file (mean of replicas, or --rank R's)")
    export.add_argument("url")
    export.add_argument("out", metavar="OUT.safetensors", help="local path of the file to write")
    export.add_argument("--step", type=int, default=None, help="default: the newest")
    export.add_argument("--rank", type=int, default=None, help="export this saved rank's replica instead of the mean")
    export.add_argument("--entry", default=None, help="the state entry holding the model (default: 'model', or the only module state)")
    for p in (ls, inspect, verify, export):
        p.add_argument("--storage-options", default="{}", help="JSON object passed to fsspec, e.g. an endpoint_url")
    args = parser.parse_args(argv)
    try:
        storage = _storage(args.url, args.storage_options)
        if args.command == "ls":
            return _ls(storage, args.verify)
        if args.command == "verify":
            return _verify(storage, args.step)
        if args.command == "export":
            return _export(storage, args)
        return _inspect(storage, args.step, args.full)
    except (CheckpointError, OSError, ValueError) as exc:
        _error(str(exc))
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback from a storage library
        _error(f"{type(exc).__name__}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
