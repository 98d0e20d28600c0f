"""Fault injection with real torchrun agents and workers (gloo, loopback only)."""

from __future__ import annotations

import os
import signal

import pytest

from elastic_hsgd.checkpoint.layout import COMMIT_NAME
from elastic_hsgd.checkpoint.storage import Storage
from tests.distributed import free_port
from tests.torchrun_job import (
    Agent,
    blocking_fs_env,
    elastic_nodes,
    kill_worker_then_finish,
    run_to_done,
    run_to_exit,
    single_node,
    stop_all,
    wait_for_file,
    wait_port,
)

pytestmark = pytest.mark.torchrun

TRAIN = ["--steps", "120", "--checkpoint-every", "20", "--warmup-steps", "10", "--hierarchy", "2:2,4:world", "--step-delay", "0.02", "--collective-timeout", "20"]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param([], id="plain-averaging"),
        # Hierarchical DiLoCo: Nesterov outer steps on every level, bf16 pseudo-gradients on top;
        # anchors and momentum must come back from the checkpoint exactly.
        pytest.param(["--outer-levels", "all", "--comm-dtype", "bf16", "--outer-lr", "0.7"], id="outer-optimizers"),
    ],
)
def test_killed_worker_resumes_to_a_bit_identical_result(tmp_path, options):
    train = [*TRAIN, *options]
    reference = Agent(single_node(free_port()), [*train, "--checkpoint-url", str(tmp_path / "ref")], tmp_path, "reference")
    expected = run_to_done(reference)

    agent = Agent(single_node(free_port()), [*train, "--checkpoint-url", str(tmp_path / "run")], tmp_path, "killed")
    run = kill_worker_then_finish(agent, lambda e: e["event"] == "checkpoint" and e["step"] >= 20, "first checkpoint")
    resumed, done = run.resumed, run.done
    assert resumed["world_size"] == 4 and resumed["previous_world_size"] == 4 and resumed["step"] >= 20
    assert done["step"] == 120
    assert done["params_sha256"] == expected["params_sha256"]


def test_lost_node_shrinks_to_two_then_a_new_node_grows_back_to_four(tmp_path):
    port = free_port()
    steps = 500
    args = [
        "--steps", str(steps), "--checkpoint-every", "25", "--warmup-steps", "10", "--hierarchy", "2:local,8:world",
        "--step-delay", "0.04", "--collective-timeout", "20", "--checkpoint-url", str(tmp_path / "ckpt"),
    ]
    torchrun = elastic_nodes(port, "lost-node")
    # The first agent hosts the rendezvous store. The rendezvous orders agents by (address, pid):
    # pinning the host's address first keeps rank 0, whose JSON lines are read below, on the host
    # even when a later agent's pid has wrapped around below the host's.
    host = Agent([*torchrun, "--local-addr=127.0.0.1"], args, tmp_path, "host")
    torchrun.append("--local-addr=localhost")
    agents = [host]
    try:
        wait_port(port, host)
        leaving = Agent(torchrun, args, tmp_path, "leaving")
        agents.append(leaving)
        host.wait_for(lambda e: e["event"] == "started" and e["world_size"] == 4, 60, "world of 4")
        host.wait_for(lambda e: e["event"] == "checkpoint" and e["step"] >= 50, 90, "checkpoint")
        leaving.kill()
        shrunk = host.wait_for(lambda e: e["event"] == "resumed" and e["world_size"] == 2, 90, "world of 2")
        host.wait_for(lambda e: e["event"] == "checkpoint" and e["step"] > shrunk["step"], 90, "a checkpoint at world 2")
        joining = Agent(torchrun, args, tmp_path, "joining")
        agents.append(joining)
        host.wait_for(lambda e: e["event"] == "resumed" and e["world_size"] == 4, 90, "world of 4 again")
        done = host.wait_for(lambda e: e["event"] == "done", 150, "done line")
    finally:
        stop_all(agents)

    events = host.snapshot()
    starts = [e for e in events if e["event"] in ("started", "resumed")]
    worlds = [e["world_size"] for e in starts]
    assert worlds[0] == 4 and 2 in worlds and worlds[-1] == 4, worlds
    assert worlds[worlds.index(2):][-1] == 4
    last_checkpoint = 0
    for event in events:
        if event["event"] == "checkpoint":
            last_checkpoint = event["step"]
        if event["event"] == "resumed":
            assert event["step"] >= last_checkpoint, (event, last_checkpoint)
            assert event["previous_world_size"] is not None
            # Revalidated for the new world: 'local' is 2 per node, the top level spans the world.
            assert event["hierarchy"] == [[2, 2], [8, event["world_size"]]]
    assert done["step"] == steps and done["world_size"] == 4


def test_sigkill_during_checkpoint_write_resumes_from_previous(tmp_path):
    url = tmp_path / "ckpt"
    marker = tmp_path / "mid-write"
    # Workers register a filesystem that parks rank 0 after the first chunk of
    # its step-20 file (and says so with the marker): the kill lands mid-save for certain.
    env = blocking_fs_env(tmp_path, "step_000000000020/rank_00000", marker)
    args = [
        "--steps", "60", "--checkpoint-every", "10", "--warmup-steps", "4", "--hierarchy", "2:2,4:world",
        "--collective-timeout", "20", "--checkpoint-url", f"blockingfile://{url}",
    ]
    agent = Agent(single_node(free_port()), args, tmp_path, "midsave", env=env)
    try:
        wait_for_file(marker, agent, 120, "rank 0 never started writing step 20")
        rank0 = int(marker.read_text())
        assert rank0 == next(e["pid"] for e in agent.snapshot() if e["event"] == "worker" and e["rank"] == 0)
        os.kill(rank0, signal.SIGKILL)
        assert not (url / "step_000000000020" / COMMIT_NAME).exists()
        resumed = agent.wait_for(lambda e: e["event"] == "resumed", 90, "resumed line")
        done = run_to_done(agent)
    finally:
        agent.stop()
    assert resumed["step"] == 10
    assert done["step"] == 60
    assert Storage(str(url)).committed_steps()[-1] == 60


def test_hierarchy_that_no_longer_fits_fails_every_worker_without_hanging(tmp_path):
    args = ["--steps", "20", "--hierarchy", "2:4,8:world", "--checkpoint-url", str(tmp_path / "ckpt")]
    agent = Agent(single_node(free_port(), nproc=2, max_restarts=0), args, tmp_path, "misfit")
    run_to_exit(agent, 90)
    assert agent.proc.returncode != 0
    stderr = agent.stderr_tail(200_000)
    assert stderr.count("does not fit world size 2") >= 2, stderr[-3000:]
    assert "group size 4 (period 2) does not divide the world size 2" in stderr or "is smaller than 4" in stderr
