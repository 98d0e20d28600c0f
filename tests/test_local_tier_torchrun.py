"""The node-local tier under real torchrun agents: a killed worker, a lost node, a node joining.

The two "nodes" here are two agents on 127.0.0.1 sharing one filesystem, so
each agent gets its own ``--local-checkpoint-url`` folder (in Kubernetes each
pod's ``emptyDir`` is separate by itself).
"""

from __future__ import annotations

import time

import pytest

from elastic_hsgd.checkpoint.layout import parse_step_dir
from tests.distributed import free_port
from tests.torchrun_job import (
    Agent,
    blocking_fs_env,
    elastic_nodes,
    kill_worker_then_finish,
    run_to_done,
    single_node,
    step_reached_by,
    stop_all,
    wait_for_file,
    wait_port,
)

pytestmark = pytest.mark.torchrun

LOCAL_EVERY = 5


def _just_after_a_local_commit(event: dict) -> bool:
    """A step 1 or 2 past a local save that every node has committed (``local_committed``):
    a kill now must lose only the steps since that save."""
    step = event.get("step", 0)
    return event["event"] == "progress" and step >= 31 and step % LOCAL_EVERY in (1, 2) and event["local_committed"] == step - step % LOCAL_EVERY


def test_killed_worker_resumes_from_the_local_tier_bit_identical(tmp_path):
    train = [
        "--steps", "45", "--checkpoint-every", "50", "--local-checkpoint-every", str(LOCAL_EVERY), "--warmup-steps", "10",
        "--hierarchy", "2:2,4:world", "--log-every", "1", "--step-delay", "0.05", "--collective-timeout", "20",
    ]
    reference = Agent(single_node(free_port()), [*train, "--checkpoint-url", str(tmp_path / "ref"), "--local-checkpoint-url", str(tmp_path / "ref-local")], tmp_path, "reference")
    expected = run_to_done(reference)

    args = [*train, "--checkpoint-url", str(tmp_path / "run"), "--local-checkpoint-url", str(tmp_path / "run-local")]
    agent = Agent(single_node(free_port()), args, tmp_path, "killed")
    # Before the first cloud checkpoint (50): only the local tier can give the resumed step.
    run = kill_worker_then_finish(agent, _just_after_a_local_commit, "a step just after a committed local save", ready_s=120, resumed_s=120)
    resumed, done = run.resumed, run.done
    reached = step_reached_by(agent, run.killed_at)
    assert resumed["source"] == "local" and resumed["world_size"] == resumed["previous_world_size"] == 4, resumed
    assert 0 <= reached - resumed["step"] <= LOCAL_EVERY, (reached, resumed)
    assert done["step"] == 45
    assert done["params_sha256"] == expected["params_sha256"]


def test_lost_node_resumes_from_buddy_copies_and_a_new_node_grows_back_from_the_local_tier(tmp_path):
    port = free_port()
    steps = 400  # long enough that the world of 2 is still training when the new node has started

    def args(node: str) -> list[str]:
        return [
            "--steps", str(steps), "--checkpoint-every", "50", "--local-checkpoint-every", str(LOCAL_EVERY),
            "--warmup-steps", "10", "--hierarchy", "2:local,8:world", "--log-every", "1", "--step-delay", "0.04",
            "--collective-timeout", "15", "--checkpoint-url", str(tmp_path / "cloud"),
            "--local-checkpoint-url", str(tmp_path / f"local-{node}"),
        ]

    torchrun = elastic_nodes(port, "local-tier")
    # The rendezvous orders agents by (address, pid): pinning the host's address first keeps rank 0, and
    # the JSON lines read below, on the host even when a later agent's pid has wrapped around.
    host = Agent([*torchrun, "--local-addr=127.0.0.1"], args("host"), tmp_path, "host")
    torchrun.append("--local-addr=localhost")
    agents = [host]
    try:
        wait_port(port, host)
        leaving = Agent(torchrun, args("leaving"), tmp_path, "leaving")
        agents.append(leaving)
        host.wait_for(lambda e: e["event"] == "started" and e["world_size"] == 4, 60, "world of 4")
        host.wait_for(_just_after_a_local_commit, 120, "a step just after a committed local save")
        leaving.kill()
        killed_at = time.monotonic()
        shrunk = host.wait_for(lambda e: e["event"] == "resumed" and e["world_size"] == 2, 120, "world of 2")
        reached = step_reached_by(host, killed_at)
        host.wait_for(lambda e: e["event"] == "local_checkpoint" and (e["committed"] or 0) > shrunk["step"], 90, "a local checkpoint at world 2")
        joining = Agent(torchrun, args("joining"), tmp_path, "joining")
        agents.append(joining)
        grown = host.wait_for(lambda e: e["event"] == "resumed" and e["world_size"] == 4, 120, "world of 4 again")
        done = host.wait_for(lambda e: e["event"] == "done" and e["_t"] > grown["_t"], 150, "done line")
    finally:
        stop_all(agents)

    # Every rank of the world of 2 gets the mean of the 4 saved replicas: the survivors' own copies
    # and the buddy copies they hold for the lost node; nothing comes from the cloud.
    assert shrunk["previous_world_size"] == 4 and shrunk["source"] == "buddy", shrunk
    assert 0 <= reached - shrunk["step"] <= LOCAL_EVERY, (reached, shrunk)
    assert shrunk["step"] % 50 != 0  # a cloud checkpoint could not have given this step
    # The joining node's folder is empty: its ranks' state is sent over from the survivors.
    assert grown["previous_world_size"] == 2 and grown["source"] == "buddy", grown
    assert grown["step"] % LOCAL_EVERY == 0 and grown["step"] > shrunk["step"]
    assert done["step"] == steps and done["world_size"] == 4


def test_node_lost_mid_local_save_stops_the_survivors_at_the_next_save_and_a_joining_node_takes_rank_0(tmp_path):
    """The goodput benchmark's path: a node dies while a local save is in flight, then a new node joins and
    the rendezvous gives *it* ranks 0-1 (agents are ordered by address, then pid: a wrapped pid does this
    by chance, ``--local-addr`` here for certain), so the survivor's ranks become 2-3 on a node id of 1.

    The kill lands mid-save for certain: the leaving node's first local write of a step from 40 on (the
    first such save every rank staged: a due save is skipped while the previous one is written) parks after
    one chunk and says so with a marker. The survivors' background save then fails in the tier's
    collectives, and they must stop as soon as that is known (within LOCAL_EVERY steps of the kill) rather
    than train on unprotected until something of training's notices (here nothing would before step 100:
    gradients stay local after warmup, the world level averages every 100 steps, the cloud tier saves at
    the end). The world of 2 resumes from the newest step committed everywhere (the interrupted one is
    not), from the buddy copies of the lost node's ranks.
    """
    port, steps, blocked_from = free_port(), 200, 40
    marker = tmp_path / "leaving-mid-save"
    blocking = blocking_fs_env(tmp_path, "local-leaving/step_", marker, from_step=blocked_from)

    def args(local_url: str) -> list[str]:
        return [
            "--steps", str(steps), "--checkpoint-every", "1000", "--local-checkpoint-every", str(LOCAL_EVERY),
            "--warmup-steps", "10", "--hierarchy", "2:local,100:world", "--log-every", "1", "--step-delay", "0.02",
            "--collective-timeout", "15", "--checkpoint-url", str(tmp_path / "cloud"), "--local-checkpoint-url", local_url,
        ]

    def torchrun(local_addr: str) -> list[str]:
        # The rendezvous orders agents by (address, pid): 127.0.0.1 < 127.0.0.2 < localhost, whatever the pids.
        return [*elastic_nodes(port, "peer-lost"), f"--local-addr={local_addr}"]

    host = Agent(torchrun("127.0.0.2"), args(str(tmp_path / "local-host")), tmp_path, "host")
    agents = [host]
    try:
        wait_port(port, host)
        leaving = Agent(torchrun("localhost"), args(f"blockingfile://{tmp_path / 'local-leaving'}"), tmp_path, "leaving", env=blocking)
        agents.append(leaving)
        host.wait_for(lambda e: e["event"] == "started" and e["world_size"] == 4, 90, "world of 4")
        wait_for_file(marker, leaving, 90, f"the leaving node never started a local save from step {blocked_from} on")
        assert int(marker.read_text()) in leaving.worker_pids()
        leaving.kill()
        killed_at = time.monotonic()
        # The parked save's folder is the leaving node's newest: later due saves wrote nothing.
        blocked = max(s for s in (parse_step_dir(p.name) for p in (tmp_path / "local-leaving").iterdir()) if s is not None)
        shrunk = host.wait_for(lambda e: e["event"] == "resumed" and e["world_size"] == 2, 120, "world of 2")
        stopped_at = max(e["step"] for e in host.snapshot() if e["event"] == "progress" and e["world_size"] == 4)
        committed = max(e["local_committed"] or 0 for e in host.snapshot() if e["event"] == "progress" and e["world_size"] == 4)
        host.wait_for(lambda e: e["event"] == "local_checkpoint" and (e["committed"] or 0) > shrunk["step"], 60, "a local checkpoint at world 2")
        joining = Agent(torchrun("127.0.0.1"), args(str(tmp_path / "local-joining")), tmp_path, "joining")
        agents.append(joining)
        # Rank 0, and with it every JSON line, now lives on the joining node.
        grown = joining.wait_for(lambda e: e["event"] == "resumed" and e["world_size"] == 4, 120, "world of 4 again, on the joining node")
        done = joining.wait_for(lambda e: e["event"] == "done", 120, "done line")
    finally:
        stop_all(agents)

    reached = max(blocked, step_reached_by(host, killed_at))
    assert stopped_at < reached + LOCAL_EVERY, f"survivors trained on to step {stopped_at} after their local save of {blocked} failed"
    assert "a collective of the local tier failed" in host.stderr_tail(1_000_000)
    assert shrunk["previous_world_size"] == 4 and shrunk["source"] == "buddy" and shrunk["step"] == committed < blocked, (shrunk, committed, blocked)
    assert {e["rank"] for e in host.snapshot() if e["event"] == "worker" and e["world_size"] == 4 and e["_t"] > shrunk["_t"]} == {2, 3}
    # The joining node's folder is empty and the survivor is no longer rank 0: its copies are sent over.
    assert grown["previous_world_size"] == 2 and grown["source"] == "buddy" and grown["step"] > shrunk["step"], grown
    assert done["step"] == steps and done["world_size"] == 4
