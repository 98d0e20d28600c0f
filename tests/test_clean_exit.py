"""A short torchrun job exits 0 every time: no abort at interpreter exit.

Cause fixed (see elastic_hsgd/process_groups.py): a gloo worker thread that
drops a finished collective's tensors after the interpreter began finalizing
aborted the process ("terminate called without an active exception").
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.distributed import free_port

pytestmark = pytest.mark.torchrun

JOB = str(Path(__file__).resolve().parent / "exit_job.py")
VARIANTS = [list(v) for v in itertools.product([[], ["--async"]], [[], ["--close"]], [[], ["--destroy"]])]
RUNS = 20


def _run(index: int, flags: list[str], tmp_path: Path) -> tuple[int, list[str], int, str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--monitor-interval=0.1", JOB, "--url", str(tmp_path / f"run{index}"), *flags,
    ]
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    return index, flags, proc.returncode, proc.stderr + proc.stdout


def test_every_run_exits_zero_with_and_without_async_close_destroy(tmp_path):
    runs = [(i, sum(VARIANTS[i % len(VARIANTS)], [])) for i in range(RUNS)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda r: _run(r[0], r[1], tmp_path), runs))
    failed = [(i, flags, rc, out[-1500:]) for i, flags, rc, out in results if rc != 0 or "terminate called" in out]
    assert not failed, f"{len(failed)}/{RUNS} runs failed; first: {failed[0]}"
    assert all(out.count("exit-job done") == 2 for *_, out in results)
