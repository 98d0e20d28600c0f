"""Real local filesystems with injected faults, each under a protocol of its own.

They subclass fsspec's ``LocalFileSystem`` (real files in the test's tmp
dir); ``LocalFileSystem._strip_protocol`` strips the subclass's own
protocol, so ``faultyfile:///tmp/x`` is the absolute path ``/tmp/x``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem


class FaultyLocalFileSystem(LocalFileSystem):
    """Fails the next ``listings_to_fail`` listings and ``reads_to_fail`` reads of files ending in ``read_suffix``."""

    protocol = ("faultyfile",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.listings_to_fail = 0
        self.reads_to_fail = 0
        self.read_suffix = ""

    def ls(self, path, detail=False, **kwargs):
        if self.listings_to_fail > 0:
            self.listings_to_fail -= 1
            raise ConnectionError(f"injected: listing {path} failed")
        return super().ls(path, detail=detail, **kwargs)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "r" in mode and self.reads_to_fail > 0 and str(path).endswith(self.read_suffix):
            self.reads_to_fail -= 1
            raise ConnectionResetError(f"injected: reading {path} failed")
        return super()._open(path, mode, block_size=block_size, **kwargs)


BLOCK_MATCH_ENV = "ELASTIC_HSGD_TEST_BLOCK_MATCH"
BLOCK_MARKER_ENV = "ELASTIC_HSGD_TEST_BLOCK_MARKER"
#: With it, only a rank file (``step_N/rank_*``) of a step N at least this one parks.
BLOCK_FROM_STEP_ENV = "ELASTIC_HSGD_TEST_BLOCK_FROM_STEP"


def _from_step(path: str) -> bool:
    least = os.environ.get(BLOCK_FROM_STEP_ENV)
    if not least:
        return True
    found = re.search(r"step_(\d{12})/rank_", path)
    return found is not None and int(found.group(1)) >= int(least)


class _BlockingOpener(LocalFileOpener):
    """Writes its first chunk, then says so with a marker file and blocks (until killed)."""

    def write(self, data):
        written = self.f.write(data)
        if not getattr(self, "_announced", False):
            self._announced = True
            self.f.flush()
            marker = Path(os.environ[BLOCK_MARKER_ENV])
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(str(os.getpid()))
            tmp.rename(marker)
            release = marker.with_name(marker.name + ".release")
            end = time.monotonic() + 300
            while not release.exists() and time.monotonic() < end:
                time.sleep(0.05)  # the test kills this process here
        return written


class BlockingLocalFileSystem(LocalFileSystem):
    """Blocks mid-write in the first written file whose path contains ``$ELASTIC_HSGD_TEST_BLOCK_MATCH``
    (and, with ``$ELASTIC_HSGD_TEST_BLOCK_FROM_STEP``, is a rank file of a step at least that one).

    The file is then half written and the process parked: a kill lands
    mid-save for certain. Only once per marker: once the marker exists
    (a restarted job), writes go through.
    """

    protocol = ("blockingfile",)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        path = self._strip_protocol(path)
        match, marker = os.environ.get(BLOCK_MATCH_ENV), os.environ.get(BLOCK_MARKER_ENV)
        if "w" in mode and match and marker and match in path and _from_step(path) and not os.path.exists(marker):
            self.makedirs(self._parent(path), exist_ok=True)
            return _BlockingOpener(path, mode, fs=self, **kwargs)
        return super()._open(path, mode, block_size=block_size, **kwargs)


def register() -> None:
    fsspec.register_implementation("faultyfile", FaultyLocalFileSystem, clobber=True)
    fsspec.register_implementation("blockingfile", BlockingLocalFileSystem, clobber=True)


SITECUSTOMIZE = (
    "import fsspec\n"
    "fsspec.register_implementation('blockingfile', 'tests.faulty_fs.BlockingLocalFileSystem', clobber=True)\n"
)


def sigkill_when_parked(script: str, args: list[str], marker: Path, env: dict[str, str], what: str) -> str:
    """Run ``python -c script *args`` with this filesystem's blocking ``env``, SIGKILL it as soon as
    ``marker`` shows the write is parked (polled with a deadline), and return what it printed."""
    import signal
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline and proc.poll() is None, what
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.stdout.read()
