"""The language-model example with FSDP2 (``--shard-size 2``) under real torchrun agents (issue 21).

Four workers as 2 replicas x 2 shards: a SIGKILLed worker makes the agent restart every
worker, which resume from the last checkpoint (each rank its own shards) and end
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import pytest

from tests.distributed import free_port
from tests.test_train_lm import DONE_DEADLINE_S, TINY
from tests.torchrun_job import LM_EXAMPLE, Agent, kill_worker_then_finish, run_to_done, single_node

# TINY's model, data and schedule; FSDP2 averages a replica's gradients, so no --gradient-group.
SHARDED = list(TINY)
del SHARDED[SHARDED.index("--gradient-group") : SHARDED.index("--gradient-group") + 2]
SHARDED[SHARDED.index("--hierarchy") + 1] = "4:world"
SHARDED += ["--shard-size", "2"]


@pytest.mark.torchrun
def test_sharded_lm_killed_worker_resumes_to_a_bit_identical_result(tmp_path):
    reference = Agent(single_node(free_port()), [*SHARDED, "--checkpoint-url", str(tmp_path / "ref")], tmp_path, "reference", LM_EXAMPLE)
    expected = run_to_done(reference, DONE_DEADLINE_S)

    agent = Agent(single_node(free_port()), [*SHARDED, "--checkpoint-url", str(tmp_path / "run")], tmp_path, "killed", LM_EXAMPLE)
    run = kill_worker_then_finish(agent, lambda e: e["event"] == "checkpoint" and e["step"] >= 10, "first checkpoint", done_s=DONE_DEADLINE_S)
    assert run.resumed["world_size"] == 4 and run.resumed["previous_world_size"] == 4 and 10 <= run.resumed["step"] < 40
    assert run.done["step"] == 40
    assert run.done["params_sha256"] == expected["params_sha256"]
    assert run.done["val_loss"] == expected["val_loss"]
    started = next(e for e in reference.snapshot() if e["event"] == "started")
    assert started["hierarchy"] == [[4, 4]]
