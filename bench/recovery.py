"""Recovery time with real torchrun agents on this machine.

    python bench/recovery.py

For (1) a SIGKILLed worker under one agent and (2) a lost node (one of two
agents killed with its workers), prints the seconds from the kill to the first
training step after the resume, and the training steps lost (the step reached
at the kill minus the step resumed from).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.distributed import free_port  # noqa: E402
from tests.torchrun_job import FAST_RDZV, Agent  # noqa: E402

TRAIN = ["--steps", "100000", "--checkpoint-every", "50", "--warmup-steps", "10", "--log-every", "1", "--step-delay", "0.01", "--collective-timeout", "20"]


def _steps_before(agent: Agent, t: float) -> int:
    return max((e["step"] for e in agent.snapshot() if e["event"] == "progress" and e["_t"] <= t), default=0)


def measure(agent: Agent, kill) -> tuple[float, int, int]:
    # Kill halfway between two checkpoints (every 50 steps): the typical case, not the best one.
    agent.wait_for(lambda e: e["event"] == "progress" and e["step"] >= 125, 120, "step 125")
    killed_at = time.monotonic()
    kill()
    reached = _steps_before(agent, killed_at)
    resumed = agent.wait_for(lambda e: e["event"] == "resumed" and e["_t"] > killed_at, 120, "resume")
    first = agent.wait_for(lambda e: e["event"] == "progress" and e["_t"] > resumed["_t"], 60, "first step after resume")
    return first["_t"] - killed_at, reached - resumed["step"], resumed["world_size"]


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="elastic-hsgd-recovery-"))
    rows = []

    torchrun = ["--nnodes=1", "--nproc-per-node=4", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=3", "--monitor-interval=0.2"]
    agent = Agent(torchrun, [*TRAIN, "--hierarchy", "2:2,8:world", "--checkpoint-url", str(out / "worker")], out, "worker")
    try:
        def kill_worker() -> None:
            victim = next(e["pid"] for e in agent.snapshot() if e["event"] == "worker" and e["rank"] == 1)
            os.kill(victim, signal.SIGKILL)

        rows.append(("killed worker (1 agent x 4)", *measure(agent, kill_worker)))
    finally:
        agent.stop()

    port = free_port()
    torchrun = [
        "--nnodes=1:2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=bench", f"--rdzv-conf={FAST_RDZV}", "--max-restarts=5", "--monitor-interval=0.2",
    ]
    args = [*TRAIN, "--hierarchy", "2:local,8:world", "--checkpoint-url", str(out / "node")]
    host = Agent(torchrun, args, out, "host")
    leaving = None
    try:
        host.wait_for(lambda e: e["event"] == "worker", 60, "host workers")
        leaving = Agent(torchrun, args, out, "leaving")
        host.wait_for(lambda e: e["event"] == "started" and e["world_size"] == 4, 60, "world of 4")
        rows.append(("lost node (2 agents x 2)", *measure(host, leaving.kill)))
    finally:
        host.stop()
        if leaving is not None:
            leaving.stop()

    print(f"rendezvous: c10d on 127.0.0.1, --rdzv-conf={FAST_RDZV}, --monitor-interval=0.2, collective timeout 20 s,")
    print("checkpoint every 50 steps, 10 ms extra per step, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    print(f"{'failure':<30}{'kill -> first step (s)':>24}{'steps lost':>12}{'world after':>13}")
    for name, seconds, lost, world in rows:
        print(f"{name:<30}{seconds:>24.1f}{lost:>12}{world:>13}")


if __name__ == "__main__":
    main()
