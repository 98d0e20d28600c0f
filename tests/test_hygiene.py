"""The test session fails when a test leaves files in the source tree."""

from __future__ import annotations

import subprocess
import sys
import uuid

from tests.conftest import REPO


def test_a_test_that_leaves_a_file_in_the_repo_fails_the_session(tmp_path):
    leak = REPO / f"leak-{uuid.uuid4().hex}.tmp"
    test_file = tmp_path / "test_leaky.py"
    test_file.write_text(f"def test_leaks():\n    open({str(leak)!r}, 'w').close()\n")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(test_file)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
    finally:
        leak.unlink(missing_ok=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 passed" in run.stdout and "left 1 new file(s) in the source tree" in run.stdout and leak.name in run.stdout
