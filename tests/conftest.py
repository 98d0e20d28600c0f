from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_NOT_SOURCE = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache"}


def source_tree_files(root: Path = REPO) -> set[str]:
    """Every file under ``root`` except caches and build metadata."""
    found = set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _NOT_SOURCE and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(folder, f), root) for f in files)
    return found


def pytest_sessionstart(session):
    session.config.stash[_FILES_BEFORE] = source_tree_files()


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if a test left files in the source tree (tests write only in their tmp dirs)."""
    before = session.config.stash.get(_FILES_BEFORE, None)
    if before is None:
        return
    left = sorted(source_tree_files() - before)
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"tests left {len(left)} new file(s) in the source tree {REPO}: {left[:10]}"
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True)
        else:
            print(f"ERROR: {message}")


_FILES_BEFORE = pytest.StashKey[set]()


@pytest.fixture
def single_process_group():
    """A real gloo process group of world size 1 in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 API server process (moto_server) on 127.0.0.1, stopped afterwards."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.distributed import free_port

    port = free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not come up on {endpoint}")
                time.sleep(0.05)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def s3_options(endpoint: str) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}


@pytest.fixture
def s3_bucket(moto_endpoint):
    import uuid

    import s3fs

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_options(moto_endpoint))
    fs.mkdir(name)  # no region: moto rejects us-east-1 as a LocationConstraint
    return f"s3://{name}", s3_options(moto_endpoint)


@pytest.fixture(params=["local", "memory", "s3"])
def checkpoint_url(request, tmp_path):
    """(url, storage_options) on each kind of storage."""
    import uuid

    if request.param == "local":
        return str(tmp_path / "ckpt"), None
    if request.param == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex[:12]}", None
    url, options = request.getfixturevalue("s3_bucket")
    return f"{url}/run", options
