"""A real torchft lighthouse and one torchrun agent per replica group, on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.distributed import free_port
from tests.torchrun_job import Agent

# How fast a dead group is dropped: no heartbeat for 1 s. join_timeout bounds how
# long a quorum waits for a heartbeating group that has not asked to join yet.
LIGHTHOUSE_FLAGS = ["--min_replicas", "1", "--heartbeat_timeout_ms", "1000", "--join_timeout_ms", "10000", "--quorum_tick_ms", "50"]


class Lighthouse:
    def __init__(self, log_dir: Path):
        binary = shutil.which("torchft_lighthouse")
        assert binary, "torchft_lighthouse not on PATH: pip install elastic_hsgd[ft]"
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, "--bind", f"[::]:{self.port}", *LIGHTHOUSE_FLAGS],
            stdout=subprocess.DEVNULL,
            stderr=open(log_dir / "lighthouse.log", "w"),
        )
        end = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert self.proc.poll() is None, (log_dir / "lighthouse.log").read_text()
            assert time.monotonic() < end, "lighthouse never listened"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_group(lighthouse: Lighthouse, group: int, script_args: list[str], log_dir: Path, name: str, nproc: int = 2) -> Agent:
    torchrun = [
        "--nnodes=1", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--max-restarts=3", "--monitor-interval=0.2",
    ]
    env = {"TORCHFT_LIGHTHOUSE": lighthouse.address, "REPLICA_GROUP_ID": str(group), "ELASTIC_HSGD_FT_HOSTNAME": "127.0.0.1"}
    return Agent(torchrun, script_args, log_dir, name, env=env)


def steps_of(agent: Agent, event: str = "progress") -> list[int]:
    return [e["step"] for e in agent.snapshot() if e["event"] == event]
