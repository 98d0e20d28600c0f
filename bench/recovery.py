"""Recovery time with real torchrun agents on this machine, with and without the node-local tier.

    python bench/recovery.py [--local-every 5]

For (1) a SIGKILLed worker under one agent and (2) a lost node (one of two
agents killed with its workers), each run once with cloud checkpoints only
(every 50 steps) and once with the node-local tier as well (every
``--local-every`` steps, each agent its own local folder), prints the seconds
from the kill to the first training step after the resume, the training steps
lost (the step rank 0 reached at the kill minus the step resumed from), and
where the resumed state came from.

    python bench/recovery.py --ft-only  # only the replica-group rows (needs torchft)

With torchft installed, (3) three replica groups of 2 workers and a real
lighthouse: one whole group SIGKILLed, then started again. Prints the
survivors' stall (the longest gap between two of their steps in the 15 s after
the kill, next to the longest gap before it), the steps they lost, the
restarted group's heal (seconds and bytes, from its ``healed`` line), and the
bytes each rank sends across groups per top-level sync next to the model bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.distributed import free_port  # noqa: E402
from tests.torchrun_job import FAST_RDZV, Agent, elastic_nodes, single_node, step_reached_by, stop_all  # noqa: E402

TRAIN = ["--steps", "100000", "--checkpoint-every", "50", "--warmup-steps", "10", "--log-every", "1", "--step-delay", "0.01", "--collective-timeout", "20"]
KILL_AT = 127  # between two cloud checkpoints (100, 150), and between two local ones (125, 130) with --local-every 5


def measure(agent: Agent, kill) -> tuple[float, int, int, str]:
    agent.wait_for(lambda e: e["event"] == "progress" and e["step"] >= KILL_AT, 180, f"step {KILL_AT}")
    killed_at = time.monotonic()
    kill()
    reached = step_reached_by(agent, killed_at)
    resumed = agent.wait_for(lambda e: e["event"] == "resumed" and e["_t"] > killed_at, 120, "resume")
    first = agent.wait_for(lambda e: e["event"] == "progress" and e["_t"] > resumed["_t"], 60, "first step after resume")
    return first["_t"] - killed_at, reached - resumed["step"], resumed["world_size"], resumed.get("source", "cloud")


def killed_worker(out: Path, tier: list[str], name: str) -> tuple:
    local = ["--local-checkpoint-url", str(out / f"{name}-local")] if tier else []
    agent = Agent(single_node(free_port()), [*TRAIN, *tier, *local, "--hierarchy", "2:2,8:world", "--checkpoint-url", str(out / name)], out, name)
    try:
        return measure(agent, agent.kill_worker)  # rank 1
    finally:
        agent.stop()


def lost_node(out: Path, tier: list[str], name: str) -> tuple:
    port = free_port()
    torchrun = elastic_nodes(port, name)

    def args(node: str) -> list[str]:
        local = ["--local-checkpoint-url", str(out / f"{name}-local-{node}")] if tier else []
        return [*TRAIN, *tier, *local, "--hierarchy", "2:local,8:world", "--checkpoint-url", str(out / name)]

    # Agents are ordered by (address, pid): the host's address sorts first, so rank 0 (whose lines
    # are read) stays on the host even if the other agent's pid wrapped around below it.
    host = Agent([*torchrun, "--local-addr=127.0.0.1"], args("host"), out, f"{name}-host")
    torchrun.append("--local-addr=localhost")
    agents = [host]
    try:
        host.wait_for(lambda e: e["event"] == "worker", 60, "host workers")
        leaving = Agent(torchrun, args("leaving"), out, f"{name}-leaving")
        agents.append(leaving)
        host.wait_for(lambda e: e["event"] in ("started", "resumed") and e["world_size"] == 4, 60, "world of 4")
        return measure(host, leaving.kill)
    finally:
        stop_all(agents)


def _progress(agent: Agent) -> list[tuple[float, int]]:
    return [(e["_t"], e["step"]) for e in agent.snapshot() if e["event"] == "progress"]


def _longest_gap(points: list[tuple[float, int]], start: float, end: float) -> float:
    times = [t for t, _ in points if start <= t <= end]
    return max((b - a for a, b in zip(times, times[1:])), default=float("nan"))


def measure_replica_groups(out: Path) -> None:
    from tests.ft_job import LIGHTHOUSE_FLAGS, ReplicaGroups

    args = [
        "--steps", "3000", "--checkpoint-every", "200", "--warmup-steps", "10", "--log-every", "1", "--step-delay", "0.02",
        "--hierarchy", "2:2,8:replicas", "--collective-timeout", "20", "--ft-timeout", "3", "--checkpoint-url", str(out / "ft"),
    ]
    job = ReplicaGroups(out)
    try:
        groups = job.start_all(3, args, "ft", quorum_s=180)
        groups[0].wait_for(lambda e: e["event"] == "progress" and e["step"] >= 200, 180, "step 200")
        killed_at = time.monotonic()
        groups[2].kill()
        time.sleep(15)  # a measurement window, not a synchronisation
        survivors = [_progress(g) for g in groups[:2]]
        stall = max(_longest_gap(p, killed_at - 15, killed_at + 15) for p in survivors)
        before = max(_longest_gap(p, killed_at - 15, killed_at) for p in survivors)
        lost = max(max(s for t, s in p if t <= killed_at) + 1 - min(s for t, s in p if t > killed_at) for p in survivors)
        restart_at = time.monotonic()
        restarted = job.start(2, args, "ft2-restarted")
        healed = restarted.wait_for(lambda e: e["event"] == "healed", 180, "healed line")
        done = [g.wait_for(lambda e: e["event"] == "done", 600, "done") for g in (groups[0], groups[1], restarted)]
    finally:
        job.stop()
    same = len({d["params_sha256"] for d in done}) == 1
    print()
    print(f"replica groups: 3 torchrun groups x 2 workers, torchft lighthouse {' '.join(LIGHTHOUSE_FLAGS)}, --ft-timeout 3 s,")
    print("top level every 8 steps (2:2,8:replicas), 20 ms extra per step, model = the digits MLP (--hidden 128)")
    print(f"{'replica groups: one group SIGKILLed':<44}{'value':>14}")
    print(f"{'survivors: longest gap between steps (s)':<44}{stall:>14.2f}   (before the kill: {before:.2f})")
    print(f"{'survivors: steps lost':<44}{max(lost, 0):>14}")
    print(f"{'survivors restarted':<44}{'no' if all(len([e for e in g.snapshot() if e['event'] == 'worker']) == 2 for g in groups[:2]) else 'YES':>14}")
    print(f"{'restarted group: launch -> healed (s)':<44}{healed['_t'] - restart_at:>14.1f}")
    print(f"{'restarted group: heal (fetch+decode+load, s)':<44}{healed['seconds']:>14.3f}")
    print(f"{'restarted group: heal bytes per rank':<44}{healed['bytes']:>14}")
    print(f"{'cross-group bytes per rank per sync':<44}{done[0]['cross_group_bytes_per_sync']:>14}   (model bytes {done[0]['model_bytes']}, ratio {done[0]['cross_group_bytes_per_sync'] / done[0]['model_bytes']:.3f})")
    print(f"{'all groups finish with the same parameters':<44}{'yes' if same else 'NO':>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-every", type=int, default=5)
    parser.add_argument("--ft-only", action="store_true", help="only the replica-group (torchft) rows")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="elastic-hsgd-recovery-"))
    if args.ft_only:
        measure_replica_groups(out)
        return
    tier = ["--local-checkpoint-every", str(args.local_every)]
    rows = []
    for failure, run in (("killed worker (1 agent x 4)", killed_worker), ("lost node (2 agents x 2)", lost_node)):
        rows.append((failure, "cloud only", *run(out, [], f"{run.__name__}-cloud")))
        rows.append((failure, f"+ local every {args.local_every}", *run(out, tier, f"{run.__name__}-local")))

    print(f"rendezvous: c10d on 127.0.0.1, --rdzv-conf={FAST_RDZV}, --monitor-interval=0.2, collective timeout 20 s,")
    print(f"cloud checkpoint every 50 steps, killed at step {KILL_AT}, 10 ms extra per step, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    print(f"{'failure':<30}{'tiers':<20}{'kill -> first step (s)':>24}{'steps lost':>12}{'world after':>13}{'source':>9}")
    for name, tiers, seconds, lost, world, source in rows:
        print(f"{name:<30}{tiers:<20}{seconds:>24.1f}{lost:>12}{world:>13}{source:>9}")
    try:
        import torchft  # noqa: F401
    except ImportError:
        print("(torchft not installed: no replica-group rows; pip install elastic_hsgd[ft])")
        return
    measure_replica_groups(out)


if __name__ == "__main__":
    main()
