"""Start real torchrun agents, read the example's JSON lines, kill what was started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = str(EXAMPLES / "train_digits.py")
LM_EXAMPLE = str(EXAMPLES / "train_lm.py")
FAST_RDZV = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3"


class Agent:
    """One torchrun agent with its workers."""

    def __init__(
        self, torchrun_args: list[str], script_args: list[str], log_dir: Path, name: str, script: str = EXAMPLE, env: dict[str, str] | None = None
    ):
        env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *torchrun_args, script, *script_args],
            stdout=subprocess.PIPE,
            stderr=open(self.stderr_path, "w"),
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                event["_t"] = time.monotonic()  # arrival time, for recovery measurements
                with self._lock:
                    self.events.append(event)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.events)

    def wait_for(self, predicate, deadline_s: float, what: str) -> dict:
        end = time.monotonic() + deadline_s
        seen = 0
        while time.monotonic() < end:
            events = self.snapshot()
            for event in events[seen:]:
                if predicate(event):
                    return event
            seen = len(events)
            if self.proc.poll() is not None and len(self.snapshot()) == seen:
                break
            time.sleep(0.01)
        raise AssertionError(f"{self.name}: no {what} within {deadline_s} s; events {self.snapshot()[-8:]}; stderr tail:\n{self.stderr_tail()}")

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            return self.stderr_path.read_text()[-n:]
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """Worker processes this agent started (torchrun puts them in sessions of their own).

        Each agent's stdout carries only its own workers' lines; pids of workers
        that already exited are skipped.
        """
        return [e["pid"] for e in self.snapshot() if e.get("event") == "worker" and _alive(e["pid"])]

    def kill(self) -> None:
        """SIGKILL this agent's workers and the agent itself, as a lost node."""
        pids = self.worker_pids()
        assert pids, f"{self.name}: no live worker pids known; events {self.snapshot()}"
        for pid in [*pids, self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        end = time.monotonic() + 10
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < end, f"{self.name}: workers {pids} survived SIGKILL"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            pids = self.worker_pids()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"

