"""The README's "Using it in your own training script" loop runs as written
under torchrun (world size 2), then resumes where it stopped."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from elastic_hsgd.checkpoint.storage import Storage
from tests.distributed import free_port
from tests.torchrun_job import TORCHRUN_ENV, single_node, torchrun_command

pytestmark = pytest.mark.torchrun

README = Path(__file__).resolve().parent.parent / "README.md"


def guide_code() -> str:
    text = README.read_text()
    section = text.split("## Using it in your own training script", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _torchrun(script: Path, url: str, steps: int, cwd: Path) -> subprocess.CompletedProcess:
    cmd = torchrun_command(single_node(free_port(), nproc=2, max_restarts=None, monitor_interval=0.1), str(script))
    env = {**os.environ, **TORCHRUN_ENV, "CHECKPOINT_URL": url, "STEPS": str(steps)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_guide_loop_runs_as_written_and_resumes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(guide_code())
    url = str(tmp_path / "ckpt")

    first = _torchrun(script, url, 20, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "no checkpoint at" in first.stderr and "starting at step 0 with world size 2" in first.stderr
    # One node of 2 workers: "local" is the whole world, and the guide says a WARNING shows it.
    assert re.search(r"WARNING levels local \(period 4\) and world \(period 16\) both resolve to groups of 2", first.stderr)
    assert Storage(url).committed_steps() == [10, 20]

    second = _torchrun(script, url, 40, tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    # The resume line names the tier it came from (only the cloud tier here).
    assert "resumed step 20 from cloud, world size 2 -> 2" in second.stderr
    assert Storage(url).committed_steps() == [20, 30, 40]
    assert "terminate called" not in first.stderr + second.stderr
