"""A real torchft lighthouse and one torchrun agent per replica group, on 127.0.0.1.

Example::

    >>> # xdoctest: +SKIP("starts torchft_lighthouse and torchrun agents")
    >>> job = ReplicaGroups(tmp_path)
    >>> try:
    ...     groups = job.start_all(2, ["--hierarchy", "2:2,4:replicas"], "group", quorum_s=120)
    ...     groups[1].kill()
    ...     restarted = job.start(1, ["--hierarchy", "2:2,4:replicas"], "group1-restarted")
    ...     restarted.wait_for(lambda e: e["event"] == "healed", 120, "healed line")
    ... finally:
    ...     job.stop()
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.distributed import free_port
from tests.torchrun_job import EXAMPLE, Agent, single_node, stop_all, wait_listening

# How fast a dead group is dropped: no heartbeat for 1 s. join_timeout bounds how
# long a quorum waits for a heartbeating group that has not asked to join yet.
# Every replica group of a job shares one heal secret (fault-tolerant mode refuses to start without one).
HEAL_SECRET = "ft-job-heal-secret-0123456789abcdef"
LIGHTHOUSE_FLAGS = ["--min_replicas", "1", "--heartbeat_timeout_ms", "1000", "--join_timeout_ms", "10000", "--quorum_tick_ms", "50"]


class Lighthouse:
    """A real ``torchft_lighthouse`` on 127.0.0.1 (:data:`LIGHTHOUSE_FLAGS`), up when this returns."""

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
        wait_listening(self.port, self.proc, 30, "lighthouse never listened", (log_dir / "lighthouse.log").read_text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_group(
    lighthouse: Lighthouse, group: int, script_args: list[str], log_dir: Path, name: str, nproc: int = 2, max_restarts: int = 3
) -> Agent:
    """Replica group ``group``: one torchrun agent of ``nproc`` workers with its own rendezvous, joined to ``lighthouse``."""
    env = {
        "TORCHFT_LIGHTHOUSE": lighthouse.address, "REPLICA_GROUP_ID": str(group), "ELASTIC_HSGD_FT_HOSTNAME": "127.0.0.1",
        "ELASTIC_HSGD_HEAL_SECRET": HEAL_SECRET,
    }
    return Agent(single_node(free_port(), nproc, max_restarts), script_args, log_dir, name, EXAMPLE, env=env)


def wait_for_quorum(groups: list[Agent], replicas: int, deadline_s: float) -> None:
    """Each group's rank 0 logged a quorum of ``replicas`` groups, within ``deadline_s`` each."""
    for g in groups:
        g.wait_for(lambda e: e["event"] == "quorum" and e["replicas"] == replicas, deadline_s, f"quorum of {replicas}")


class ReplicaGroups:
    """A lighthouse and every replica group started against it (restarted ones too): ``stop()`` ends them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.lighthouse = Lighthouse(log_dir)
        self.agents: list[Agent] = []

    def start(self, group: int, script_args: list[str], name: str, max_restarts: int = 3) -> Agent:
        """Start replica group ``group`` (again, if it was lost) as agent ``name``."""
        agent = start_group(self.lighthouse, group, script_args, self.log_dir, name, max_restarts=max_restarts)
        self.agents.append(agent)
        return agent

    def start_all(self, count: int, script_args: list[str], prefix: str, quorum_s: float) -> list[Agent]:
        """Groups 0..``count``-1 (agents ``{prefix}0``...), once each logged a quorum of all ``count``."""
        groups = [self.start(g, script_args, f"{prefix}{g}") for g in range(count)]
        wait_for_quorum(groups, count, quorum_s)
        return groups

    def stop(self) -> None:
        stop_all([*self.agents, self.lighthouse])


def steps_of(agent: Agent, event: str = "progress") -> list[int]:
    return [e["step"] for e in agent.snapshot() if e["event"] == event]
