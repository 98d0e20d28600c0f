"""fsspec I/O for checkpoints: every location is a URL, every call goes through one retry policy.

Paths are never patterns: a root such as ``runs/exp[1]/ckpt`` or ``s3://b/a b/*``
is listed with ``ls`` and addressed file by file; nothing here calls
``glob``, ``rm(recursive=True)`` or the generic ``mv``, which expand patterns.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from .layout import ABANDONED_NAME, COMMIT_NAME, MAX_COMMIT_BYTES, parse_step_dir, step_dir_name

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that retrying cannot fix.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)
READ_CHUNK_BYTES = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found or verified."""


def checksum_of(data: bytes | memoryview) -> str:
    """CRC-32 of a file's bytes: catches truncation and bit rot at memory speed.
    (Integrity against tampering is not its job: loading never runs code.)"""
    return f"crc32:{zlib.crc32(data):08x}"


def _reason(exc: BaseException) -> str:
    """An OS error's own words (``Permission denied``), not its class and errno tuple."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@dataclass(frozen=True)
class RetryPolicy:
    """How every storage call is retried: exponential backoff with full jitter, bounded in time.

    Attempt ``n`` (from 0) that fails with a transient error sleeps a random
    time in ``[0, min(max_delay_s, base_delay_s * 2**n)]`` and tries again,
    while fewer than ``retries`` retries were made and the next try would
    start within ``deadline_s`` of the first. Errors retrying cannot fix
    (missing file, permission, bad argument) are raised at once.

    It composes with the filesystem's own retries: s3fs (botocore's retries
    plus its own ``retries=5`` for throttling and connection errors) and gcsfs
    (up to 6 tries of a request) retry inside one call, so this policy sees
    only what they gave up on, and a call can last up to ``retries + 1`` times
    their inner budget. ``deadline_s`` bounds the outer loop; lower the inner
    budget through ``storage_options`` (e.g. s3fs
    ``config_kwargs={"retries": {"max_attempts": 2}}``) for a tighter bound.

    >>> RetryPolicy(retries=3, base_delay_s=0.1).max_delay(2) <= 0.4
    True
    """

    retries: int = 4
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0
    deadline_s: float = 120.0

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries={self.retries!r} must be an int >= 0.")
        for name in ("base_delay_s", "max_delay_s", "deadline_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0.")

    def max_delay(self, attempt: int) -> float:
        """The longest sleep after failed attempt ``attempt`` (from 0)."""
        return min(self.max_delay_s, self.base_delay_s * 2**attempt)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` under this policy; ``CheckpointError`` names ``what`` when it gives up."""
        started = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except _PERMANENT:
                raise
            except Exception as exc:  # noqa: BLE001 - storage backends raise anything
                delay = random.uniform(0.0, self.max_delay(attempt))
                elapsed = time.monotonic() - started
                if attempt == self.retries or elapsed + delay > self.deadline_s:
                    raise CheckpointError(f"{what} failed after {attempt + 1} attempts in {elapsed:.1f} s: {exc!r}") from exc
                logger.warning("%s failed (%r); retry %d/%d in %.2f s", what, exc, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


class Storage:
    """A checkpoint root on any fsspec filesystem; every call is retried by ``policy``."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, policy: RetryPolicy | None = None):
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.policy = policy or RetryPolicy()

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under the root (joined with ``/``, never a pattern)."""
        return "/".join([self.root, *parts])

    def _call(self, what: str, path: str, fn: Callable[[], T]) -> T:
        return self.policy.call(f"{what} {self.fs.unstrip_protocol(path)}", fn)

    def check_writable(self) -> None:
        """Fail now, with the URL in the message, if the root cannot be written and read back."""
        probe = self.path(f".probe-{uuid.uuid4().hex}")
        container = self.root.split("/", 1)[0]
        advice = "Check the URL, the credentials (storage_options or environment) and write permission."
        # Object stores' makedirs would create a missing bucket: a typo'd
        # bucket name must fail here instead. (Local roots start with "/".)
        try:
            missing = bool(container) and not self.exists(container)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"checkpoint URL {self.url!r} is not reachable: {_reason(exc)}. {advice}") from exc
        if missing:
            raise CheckpointError(f"checkpoint URL {self.url!r}: bucket or container {container!r} does not exist. {advice}")
        try:
            self._call("creating", self.root, lambda: self.fs.makedirs(self.root, exist_ok=True))
            self.write_atomic(probe, b"ok")
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint URL {self.url!r} is not writable: creating a file there failed: {_reason(exc)}. {advice}"
            ) from exc
        try:
            if self.read_file(probe) != b"ok":
                raise OSError("the probe file read back different bytes")
            self.rm_file(probe)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"checkpoint URL {self.url!r} does not read back what was written: {_reason(exc)}. {advice}") from exc

    def writable_error(self) -> str | None:
        """:meth:`check_writable`'s failure as text (to be agreed by every rank), ``None`` if writable."""
        try:
            self.check_writable()
        except CheckpointError as exc:
            return str(exc)
        return None

    # -- writing -----------------------------------------------------------

    def write_file(self, path: str, chunks: list[bytes | memoryview]) -> tuple[str, int]:
        """Write ``chunks`` to ``path`` (retried); return checksum and size, computed while writing."""
        views = [memoryview(c).cast("B") for c in chunks if memoryview(c).nbytes]
        digest: dict[str, str] = {}

        def hash_all() -> None:
            crc = 0
            for view in views:
                crc = zlib.crc32(view, crc)  # zlib releases the GIL: this runs beside the writes
            digest["checksum"] = f"crc32:{crc:08x}"

        hasher = threading.Thread(target=hash_all)
        hasher.start()

        def write() -> None:
            with self.fs.open(path, "wb") as f:
                for view in views:
                    f.write(view)

        try:
            self._make_parent(path)
            self._call("writing", path, write)
        finally:
            hasher.join()
        return digest["checksum"], sum(v.nbytes for v in views)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Make ``path`` appear whole or not at all: write a temporary name, then move it."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self._make_parent(tmp)
        self._call("writing", tmp, lambda: self.fs.pipe_file(tmp, data))
        self._call("committing", path, lambda: self._move(tmp, path))

    def create(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists; ``True`` if this call created it.

        Exclusive where the filesystem offers it, so of two writers racing for
        a name exactly one wins: a local folder links a complete temporary file
        to the name (fails if it exists), S3 makes a conditional PUT
        (``If-None-Match: *``, botocore > 1.35.20). Other filesystems get
        fsspec's ``mode="create"`` (a check, then a write).
        """
        self._make_parent(path)
        try:
            self._call("creating", path, lambda: self._create(path, data))
        except FileExistsError:
            return False
        return True

    def _create(self, path: str, data: bytes) -> None:
        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # the name appears whole, or FileExistsError
            except FileExistsError:
                raise
            except OSError:  # no hard links here (some FUSE and network filesystems)
                with open(path, "xb") as f:
                    f.write(data)
            finally:
                os.unlink(tmp)
            return
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise
        except TypeError:  # an fsspec without mode=: check, then write
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            self.fs.pipe_file(path, data)
        except Exception:
            # S3 refuses a lost race with 412 PreconditionFailed, which s3fs raises as a plain OSError.
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            raise

    def _move(self, source: str, target: str) -> None:
        if type(self.fs).mv is AbstractFileSystem.mv:
            # The generic mv is copy + rm of expanded patterns: do its work file by
            # file instead, so brackets or '*' in the root are never a pattern.
            # (Object stores make a copied object appear whole.)
            self.fs.cp_file(source, target)
            self.fs.rm_file(source)
        else:
            self.fs.mv(source, target)  # a filesystem's own move, e.g. a local rename

    def _make_parent(self, path: str) -> None:
        # Local folders need it; object stores treat it as a no-op.
        parent = path.rsplit("/", 1)[0]
        self._call("creating", parent, lambda: self.fs.makedirs(parent, exist_ok=True))

    # -- reading -----------------------------------------------------------

    def size(self, path: str) -> int:
        """The size of the file at ``path`` in bytes (``FileNotFoundError`` if there is none)."""
        return int(self._call("sizing", path, lambda: self.fs.size(path)))

    def read_file(self, path: str, *, max_bytes: int = MAX_COMMIT_BYTES) -> bytes:
        """A small file's bytes (e.g. a commit record); refuses one larger than ``max_bytes``."""
        size = self.size(path)
        if size > max_bytes:
            raise CheckpointError(f"{self.fs.unstrip_protocol(path)} is {size} bytes, more than the {max_bytes} allowed")
        return bytes(self.read_into(path, size)[0])

    def read_into(self, path: str, nbytes: int) -> tuple[bytearray, str]:
        """Read exactly ``nbytes`` into one new buffer, chunk by chunk; return it and its checksum.

        No second full copy: each chunk lands in place (at most one chunk is
        held twice, in the filesystem's read buffer).
        """
        buffer = bytearray(nbytes)
        view = memoryview(buffer)

        def read() -> str:
            crc, position = 0, 0
            with self.fs.open(path, "rb") as f:
                while position < nbytes:
                    got = f.readinto(view[position : position + READ_CHUNK_BYTES])
                    if not got:
                        raise CheckpointError(f"{self.fs.unstrip_protocol(path)} ended after {position} of {nbytes} bytes")
                    crc = zlib.crc32(view[position : position + got], crc)
                    position += got
                if f.read(1):
                    raise CheckpointError(f"{self.fs.unstrip_protocol(path)} is longer than {nbytes} bytes")
            return f"crc32:{crc:08x}"

        checksum = self._call("reading", path, read)
        return buffer, checksum

    # -- listing -----------------------------------------------------------

    def list_names(self, path: str) -> list[str]:
        """Base names in a folder (``[]`` if it does not exist); never a pattern."""
        self.fs.invalidate_cache(path)
        try:
            entries = self._call("listing", path, lambda: self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def step_dirs(self) -> list[int]:
        """Steps that have a directory, committed or not, oldest first."""
        return sorted(s for s in map(parse_step_dir, self.list_names(self.root)) if s is not None)

    def committed_steps(self) -> list[int]:
        """Steps whose commit record exists, oldest first (a fresh listing: other ranks write too).

        Steps marked abandoned (an ``ABANDONED`` file: a load of an older step
        left them behind; deleted at the next save) are left out.
        """
        committed = []
        for step in self.step_dirs():
            names = self.list_names(self.path(step_dir_name(step)))
            if COMMIT_NAME in names and ABANDONED_NAME not in names:
                committed.append(step)
        return committed

    def commit_path(self, step: int) -> str:
        """The path of step ``step``'s commit record."""
        return self.path(step_dir_name(step), COMMIT_NAME)

    # -- deleting ----------------------------------------------------------

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists now (the listing cache is dropped first)."""
        self.fs.invalidate_cache(path)
        return bool(self._call("checking", path, lambda: self.fs.exists(path)))

    def rm_file(self, path: str) -> None:
        """Delete one file; one that is already gone is fine."""
        try:
            self._call("deleting", path, lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        """Delete a step folder file by file (``rm(recursive=True)`` would expand patterns)."""
        self.fs.invalidate_cache(path)
        try:
            files = self._call("listing", path, lambda: self.fs.find(path, withdirs=False))
        except FileNotFoundError:
            files = []
        for file in files:
            self.rm_file(file)
        for folder in sorted({f.rsplit("/", 1)[0] for f in files} | {path}, key=len, reverse=True):
            try:
                self.fs.rmdir(folder)  # local folders; object stores have none left
            except Exception:  # noqa: BLE001 - not there, or not a concept of this store
                pass
        self.fs.invalidate_cache(path)
