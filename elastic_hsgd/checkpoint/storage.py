"""fsspec I/O for checkpoints: every location is a URL, every write is retried."""

from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from .layout import COMMIT_NAME, parse_step_dir, step_dir_name

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that retrying cannot fix.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found or verified."""


def checksum_of(data: bytes | memoryview) -> str:
    """CRC-32 of a file's bytes: catches truncation and bit rot at memory speed.
    (Integrity against tampering is not its job: loading never runs code.)"""
    return f"crc32:{zlib.crc32(data):08x}"


class Storage:
    """A checkpoint root on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, retries: int = 4, backoff_s: float = 0.2):
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.retries = retries
        self.backoff_s = backoff_s

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient errors with exponential backoff."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except _PERMANENT:
                raise
            except Exception as exc:  # noqa: BLE001 - storage backends raise anything
                if attempt == self.retries:
                    raise CheckpointError(f"{what} failed after {attempt + 1} attempts: {exc!r}") from exc
                delay = self.backoff_s * 2**attempt
                logger.warning("%s failed (%r); retry %d/%d in %.1f s", what, exc, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def check_writable(self) -> None:
        """Fail now, with the URL in the message, if the root cannot be written and read back."""
        probe = self.path(f".probe-{uuid.uuid4().hex}")
        container = self.root.split("/", 1)[0]
        try:
            # Object stores' makedirs would create a missing bucket: a typo'd
            # bucket name must fail here instead. (Local roots start with "/".)
            if container and not self.fs.exists(container):
                raise FileNotFoundError(f"bucket or container {container!r} does not exist")
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            if self.fs.cat_file(probe) != b"ok":
                raise OSError("probe file read back different bytes")
            self.fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint URL {self.url!r} is not usable: {exc!r}. Check the URL, that the bucket "
                "or folder exists, the credentials (storage_options or environment) and write permission."
            ) from exc

    def write_file(self, path: str, chunks: list[bytes | memoryview]) -> tuple[str, int]:
        """Write ``chunks`` to ``path`` (retried); return checksum and size, computed while writing."""
        views = [memoryview(c) for c in chunks if memoryview(c).nbytes]
        digest: dict[str, str] = {}

        def hash_all() -> None:
            crc = 0
            for view in views:
                crc = zlib.crc32(view, crc)  # zlib releases the GIL: this runs beside the writes
            digest["checksum"] = f"crc32:{crc:08x}"

        hasher = threading.Thread(target=hash_all)
        hasher.start()

        def write() -> None:
            self._make_parent(path)
            with self.fs.open(path, "wb") as f:
                for view in views:
                    f.write(view)

        try:
            self.retry(f"writing {self.fs.unstrip_protocol(path)}", write)
        finally:
            hasher.join()
        return digest["checksum"], sum(v.nbytes for v in views)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Make ``path`` appear whole or not at all: write a temporary name, then move it."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self._make_parent(tmp)
        self.retry(f"writing {self.fs.unstrip_protocol(tmp)}", lambda: self.fs.pipe_file(tmp, data))
        self.retry(f"committing {self.fs.unstrip_protocol(path)}", lambda: self.fs.mv(tmp, path))

    def _make_parent(self, path: str) -> None:
        # Local folders need it; object stores treat it as a no-op.
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)

    def read_file(self, path: str) -> bytes:
        return self.retry(f"reading {self.fs.unstrip_protocol(path)}", lambda: self.fs.cat_file(path))

    def step_dirs(self) -> list[int]:
        """Steps that have a directory, committed or not, oldest first."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(s for s in map(parse_step_dir, entries) if s is not None)

    def committed_steps(self) -> list[int]:
        """Steps whose commit record exists, oldest first (a fresh listing: other ranks write too)."""
        self.fs.invalidate_cache(self.root)
        commits = self.fs.glob(self.path("step_*", COMMIT_NAME))
        return sorted(s for s in (parse_step_dir(c.rsplit("/", 1)[0]) for c in commits) if s is not None)

    def commit_path(self, step: int) -> str:
        return self.path(step_dir_name(step), COMMIT_NAME)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def remove_tree(self, path: str) -> None:
        try:
            self.retry(f"deleting {self.fs.unstrip_protocol(path)}", lambda: self.fs.rm(path, recursive=True))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)
