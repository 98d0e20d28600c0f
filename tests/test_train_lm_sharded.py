"""The language-model example with FSDP2 (``--shard-size 2``) under real torchrun agents (issue 21).

Four workers as 2 replicas x 2 shards: a SIGKILLed worker makes the agent restart every
worker, which resume from the last checkpoint (each rank its own shards) and end
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import pytest

from tests.test_train_lm import TINY, reference_and_killed

# TINY's model, data and schedule; FSDP2 averages a replica's gradients, so no --gradient-group.
SHARDED = list(TINY)
del SHARDED[SHARDED.index("--gradient-group") : SHARDED.index("--gradient-group") + 2]
SHARDED[SHARDED.index("--hierarchy") + 1] = "4:world"
SHARDED += ["--shard-size", "2"]


@pytest.mark.torchrun
def test_sharded_lm_killed_worker_resumes_to_a_bit_identical_result(tmp_path):
    reference, expected, run = reference_and_killed(SHARDED, tmp_path, 10)
    assert run.resumed["world_size"] == 4 and run.resumed["previous_world_size"] == 4 and 10 <= run.resumed["step"] < 40
    assert run.done["step"] == 40
    assert run.done["params_sha256"] == expected["params_sha256"]
    assert run.done["val_loss"] == expected["val_loss"]
    started = next(e for e in reference.snapshot() if e["event"] == "started")
    assert started["hierarchy"] == [[4, 4]]
