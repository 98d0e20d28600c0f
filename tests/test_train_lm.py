"""The language-model example: corpus, batches and model as pure functions, then under real torchrun agents."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.distributed import free_port
from tests.torchrun_job import EXAMPLES, LM_EXAMPLE, Agent, kill_worker_then_finish, run_to_done, single_node

sys.path.insert(0, str(EXAMPLES))
import train_lm  # noqa: E402


def test_corpus_is_deterministic_split_by_file_and_hashed():
    a, b = train_lm.load_corpus(300_000), train_lm.load_corpus(300_000)
    assert a.sha256 == b.sha256 and torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert len(a.train) + len(a.val) == 300_000
    assert a.val_files == a.files // 10 and a.val_files >= 1
    files = train_lm.source_files(train_lm.Path(a.root))
    assert all(not ({"test", "tests", "site-packages"} & set(p.relative_to(a.root).parts)) for p in files)
    # Held out by file: the 10th file's text is in val and nowhere in train.
    tenth = files[9].read_bytes()[:200]
    assert tenth in bytes(a.val.numpy()) and tenth not in bytes(a.train.numpy())
    assert train_lm.load_corpus(300_001).sha256 != a.sha256


def test_batches_are_a_pure_function_of_seed_step_rank_and_world():
    data = torch.arange(1000, dtype=torch.int64) % 256
    x1, y1 = train_lm.lm_batch(data, 3, 17, 1, 4, 5, 16)
    x2, y2 = train_lm.lm_batch(data, 3, 17, 1, 4, 5, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (5, 16)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next bytes
    other_rank, _ = train_lm.lm_batch(data, 3, 17, 2, 4, 5, 16)
    other_step, _ = train_lm.lm_batch(data, 3, 18, 1, 4, 5, 16)
    assert not torch.equal(x1, other_rank) and not torch.equal(x1, other_step)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = train_lm.TinyGPT(train_lm.GPTConfig(context=16, width=32, layers=2, heads=4))
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_bad_model_shape_is_refused_with_the_fix():
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--width", "30", "--heads", "4"])


TINY = [
    "--steps", "40", "--checkpoint-every", "10", "--log-every", "10", "--warmup-steps", "4", "--hierarchy", "4:4,8:world", "--gradient-group", "2",
    "--width", "32", "--layers", "1", "--heads", "2", "--context", "32", "--batch-size", "4", "--corpus-bytes", "300000",
    "--val-windows", "16", "--lr-warmup-steps", "5", "--step-delay", "0.05", "--collective-timeout", "20",
]
DONE_DEADLINE_S = 120


def reference_and_killed(flags: list[str], tmp_path, first_checkpoint: int):
    """An uninterrupted run of ``flags`` and one whose worker is SIGKILLed after the first checkpoint at or
    after step ``first_checkpoint`` and resumes: (the reference agent, its ``done`` line, the killed run)."""
    reference = Agent(single_node(free_port()), [*flags, "--checkpoint-url", str(tmp_path / "ref")], tmp_path, "reference", LM_EXAMPLE)
    expected = run_to_done(reference, DONE_DEADLINE_S)
    agent = Agent(single_node(free_port()), [*flags, "--checkpoint-url", str(tmp_path / "run")], tmp_path, "killed", LM_EXAMPLE)
    saved = lambda e: e["event"] == "checkpoint" and e["step"] >= first_checkpoint  # noqa: E731
    return reference, expected, kill_worker_then_finish(agent, saved, "first checkpoint", done_s=DONE_DEADLINE_S)


@pytest.mark.torchrun
def test_lm_killed_worker_resumes_to_a_bit_identical_result_and_reports_val_loss(tmp_path):
    reference, expected, run = reference_and_killed(TINY, tmp_path, 10)
    resumed, done = run.resumed, run.done

    started = next(e for e in reference.snapshot() if e["event"] == "started")
    assert started["corpus_sha256"] == train_lm.load_corpus(300_000).sha256
    assert resumed["corpus_sha256"] == started["corpus_sha256"]
    assert resumed["world_size"] == 4 and resumed["previous_world_size"] == 4 and 10 <= resumed["step"] < 40
    assert done["step"] == 40
    assert done["params_sha256"] == expected["params_sha256"]
    assert done["val_loss"] == expected["val_loss"]
    progress = [e for e in reference.snapshot() if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [10, 20, 30, 40]
    # Nats per byte: below a uniform guess over 256 bytes, and it went down while training.
    assert math.isfinite(expected["val_loss"]) and expected["val_loss"] < progress[0]["val_loss"] < math.log(256)


# TINY with hierarchical DiLoCo on the world level, its sync overlapped by 2 steps: it fires at the calls of
# steps 8, 16, 24, 32 and lands at 10, 18, 26, 34. A checkpoint every 9 steps is saved after the calls of
# steps 8 and 17, each with a sync in flight, so the resume must finish one it did not start.
DELAYED = list(TINY)
DELAYED[DELAYED.index("--checkpoint-every") + 1] = "9"
DELAYED += ["--outer-levels", "top", "--outer-lr", "0.7", "--outer-momentum", "0.9", "--comm-dtype", "bf16", "--sync-delay", "2"]


@pytest.mark.torchrun
def test_lm_with_an_overlapped_sync_killed_mid_flight_resumes_bit_identical(tmp_path):
    _, expected, run = reference_and_killed(DELAYED, tmp_path, 9)
    assert run.resumed["world_size"] == 4 and run.resumed["previous_world_size"] == 4
    assert run.resumed["step"] in (9, 18), f"resumed at {run.resumed['step']}: not a checkpoint taken with a sync in flight"
    assert run.done["step"] == 40
    assert run.done["params_sha256"] == expected["params_sha256"]
    assert run.done["val_loss"] == expected["val_loss"]
