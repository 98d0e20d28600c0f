"""Replica groups on torchft with real torchrun agents and a real lighthouse (gloo, loopback)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchft")

from elastic_hsgd.checkpoint.storage import Storage  # noqa: E402
from elastic_hsgd.elastic import GENERATION_FILE  # noqa: E402
from tests.distributed import free_port  # noqa: E402
from tests.ft_job import ReplicaGroups, steps_of, wait_for_quorum  # noqa: E402
from tests.torchrun_job import Agent, run_to_exit, single_node  # noqa: E402

pytestmark = pytest.mark.torchrun

TRAIN = [
    "--warmup-steps", "4", "--hierarchy", "2:2,4:replicas", "--hidden", "16", "--log-every", "1",
    "--collective-timeout", "20", "--ft-timeout", "3",
]


def _workers(agent: Agent) -> list[int]:
    return [e["pid"] for e in agent.snapshot() if e["event"] == "worker"]


def _never_goes_back(agent: Agent) -> None:
    steps = steps_of(agent)
    assert steps == sorted(steps) and len(set(steps)) == len(steps), f"{agent.name} went back: {steps}"


def test_survivors_keep_training_and_restarted_groups_heal_from_a_peer(tmp_path):
    url = tmp_path / "ckpt"
    # Paced so the survivors outlive a restart of the lost group and then of a worker
    # (up to ~30 s each on 2 loaded cores: imports, data, DDP, then the heal itself takes ms).
    args = [*TRAIN, "--steps", "2000", "--checkpoint-every", "100", "--step-delay", "0.05", "--checkpoint-url", str(url)]
    job = ReplicaGroups(tmp_path)
    try:
        groups = job.start_all(3, args, "group", quorum_s=120)
        groups[0].wait_for(lambda e: e["event"] == "checkpoint" and e["step"] >= 100, 120, "first checkpoint")
        generation = (url / GENERATION_FILE).read_bytes()
        survivors_pids = {g.name: _workers(g) for g in groups[:2]}

        # 1. A whole group dies (workers and agent): the others go on without restarting.
        groups[2].kill()
        wait_for_quorum(groups[:2], 2, 60)
        at_kill = max(steps_of(groups[0]))
        groups[0].wait_for(lambda e: e["event"] == "progress" and e["step"] >= at_kill + 8, 60, "training on after the loss")

        # 2. Started again, it heals from a live peer instead of reading the checkpoint.
        restarted = job.start(2, args, "group2-restarted")
        healed = restarted.wait_for(lambda e: e["event"] == "healed", 120, "healed line")
        assert healed["source_replica"] in (0, 1) and healed["replica_group"] == 2 and healed["bytes"] > 0
        assert healed["step"] > at_kill
        for g in groups[:2]:
            g.wait_for(lambda e: e["event"] == "quorum" and e["replicas"] == 3 and e["step"] >= healed["step"] - 1, 60, "quorum of 3 again")

        # 3. One worker of group 1 dies: torchelastic restarts that group, which heals.
        groups[1].kill_worker(1)
        healed1 = groups[1].wait_for(lambda e: e["event"] == "healed", 120, "group 1 healed after its restart")
        assert healed1["source_replica"] in (0, 2)

        done = [g.wait_for(lambda e: e["event"] == "done", 400, "done line") for g in (groups[0], groups[1], restarted)]
    finally:
        job.stop()

    assert {d["step"] for d in done} == {2000}
    assert len({d["params_sha256"] for d in done}) == 1, done
    assert [d["replica_group"] for d in done] == [0, 1, 2]
    # Group 0 never restarted; group 1 restarted only its own workers (2 new pids).
    assert _workers(groups[0]) == survivors_pids["group0"]
    assert len(_workers(groups[1])) == 4 and _workers(groups[1])[:2] == survivors_pids["group1"]
    _never_goes_back(groups[0])
    # Nothing read the checkpoint to join: no resume line, the generation counter untouched.
    for agent in (restarted,):
        assert not [e for e in agent.snapshot() if e["event"] in ("started", "resumed")]
    assert not [e for e in groups[1].snapshot() if e["event"] == "resumed"]
    assert (url / GENERATION_FILE).read_bytes() == generation
    assert Storage(str(url)).committed_steps()[-1] == 2000


def test_outer_nesterov_on_replicas_survives_a_lost_group_and_heals_anchors_and_momentum(tmp_path):
    """Hierarchical DiLoCo across replica groups: the outer step runs on torchft's top level."""
    url = tmp_path / "ckpt"
    args = [
        *TRAIN, "--outer-levels", "top", "--steps", "1200", "--checkpoint-every", "400", "--step-delay", "0.04",
        "--checkpoint-url", str(url),
    ]
    job = ReplicaGroups(tmp_path)
    try:
        groups = job.start_all(2, args, "diloco", quorum_s=120)
        # Past warmup and several outer steps: anchors and momentum exist on every rank.
        at_kill = _kill_group_1_past(groups, 40)
        restarted, healed, done = _restart_group_1_to_heal_and_finish(job, args, "diloco1-restarted", groups[0], at_kill)
    finally:
        job.stop()
    assert {d["step"] for d in done} == {1200}
    # Same parameters, and the same anchors and outer momentum: they travelled with the heal
    # and every outer step after it was the same step on both groups.
    assert len({d["params_sha256"] for d in done}) == 1, done
    assert all(d.get("outer_sha256") for d in done) and len({d["outer_sha256"] for d in done}) == 1, done
    _never_goes_back(groups[0])
    assert not [e for e in restarted.snapshot() if e["event"] in ("started", "resumed")]


def test_every_group_killed_resumes_from_the_durable_checkpoint(tmp_path):
    url = tmp_path / "ckpt"
    args = [*TRAIN, "--steps", "120", "--checkpoint-every", "20", "--step-delay", "0.03", "--checkpoint-url", str(url)]
    job = ReplicaGroups(tmp_path)
    try:
        agents = [job.start(g, args, f"first{g}") for g in range(2)]
        agents[0].wait_for(lambda e: e["event"] == "checkpoint" and e["step"] >= 40, 120, "a checkpoint")
        for agent in agents:
            agent.kill()
        committed = Storage(str(url)).committed_steps()[-1]
        assert committed >= 40
        again = [job.start(g, args, f"again{g}") for g in range(2)]
        resumed = [a.wait_for(lambda e: e["event"] in ("resumed", "healed"), 120, "resumed line") for a in again]
        done = [a.wait_for(lambda e: e["event"] == "done", 180, "done line") for a in again]
    finally:
        job.stop()
    # Whichever group formed the first quorum resumed from the checkpoint; a later one may heal from it.
    assert any(r["event"] == "resumed" and r["step"] == committed for r in resumed), resumed
    assert all(r["step"] >= committed for r in resumed)
    assert len({d["params_sha256"] for d in done}) == 1 and {d["step"] for d in done} == {120}


def test_top_level_other_than_replicas_is_refused_on_every_rank(tmp_path):
    torchrun = single_node(free_port(), nproc=2, max_restarts=0, monitor_interval=None)
    env = {"TORCHFT_LIGHTHOUSE": "http://127.0.0.1:9", "REPLICA_GROUP_ID": "0"}
    agent = Agent(torchrun, ["--steps", "8", "--hierarchy", "2:2,4:world", "--checkpoint-url", str(tmp_path / "c")], tmp_path, "misfit", env=env)
    run_to_exit(agent, 90)
    assert agent.proc.returncode != 0
    stderr = agent.stderr_tail(200_000)
    assert stderr.count("make the last level 'replicas'") >= 2, stderr[-3000:]


def test_sharded_replica_groups_heal_a_restarted_group_shard_by_shard(tmp_path):
    """Each group is 1 replica x 2 FSDP2 shards (15 hidden rows: 8 + 7); rank r of a restarted group heals rank r's shards."""
    url = tmp_path / "ckpt"
    args = [
        *TRAIN, "--hidden", "15", "--shard-size", "2", "--outer-levels", "top", "--steps", "1000", "--checkpoint-every", "400",
        "--step-delay", "0.04", "--checkpoint-url", str(url),
    ]
    job = ReplicaGroups(tmp_path)
    try:
        groups = job.start_all(2, args, "sharded", quorum_s=120)
        at_kill = _kill_group_1_past(groups, 24)
        generation = (url / GENERATION_FILE).read_bytes()
        restarted, healed, done = _restart_group_1_to_heal_and_finish(job, args, "sharded1-restarted", groups[0], at_kill)
        assert healed["bytes"] > 0
    finally:
        job.stop()
    assert {d["step"] for d in done} == {1000}
    # The full tensors (gathered from both shards) and rank 0's anchors and momentum agree across the groups.
    assert len({d["params_sha256"] for d in done}) == 1, done
    assert all(d.get("outer_sha256") for d in done) and len({d["outer_sha256"] for d in done}) == 1, done
    _never_goes_back(groups[0])
    assert not [e for e in restarted.snapshot() if e["event"] in ("started", "resumed")]
    assert (url / GENERATION_FILE).read_bytes() == generation  # the restarted group read no checkpoint
    assert Storage(str(url)).committed_steps()[-1] == 1000


def _kill_group_1_past(groups: list, step: int) -> int:
    """SIGKILL group 1 once it logged progress at ``step``; wait for group 0's quorum of 1; group 0's step then."""
    groups[1].wait_for(lambda e: e["event"] == "progress" and e["step"] >= step, 120, "outer steps taken")
    groups[1].kill()
    groups[0].wait_for(lambda e: e["event"] == "quorum" and e["replicas"] == 1, 60, "quorum of 1")
    return max(steps_of(groups[0]))


def _restart_group_1_to_heal_and_finish(job: ReplicaGroups, args: list[str], name: str, survivor, at_kill: int) -> tuple:
    """Start group 1 again: it heals from group 0 past ``at_kill``; then both run to their done lines."""
    restarted = job.start(1, args, name)
    healed = restarted.wait_for(lambda e: e["event"] == "healed", 120, "healed line")
    assert healed["source_replica"] == 0 and healed["step"] > at_kill
    done = [g.wait_for(lambda e: e["event"] == "done", 300, "done line") for g in (survivor, restarted)]
    return restarted, healed, done
