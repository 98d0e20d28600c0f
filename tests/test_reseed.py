"""Per-rank RNG after resume: ``rank_seed`` as a pure function, then ``resume`` in real gloo worlds."""

from __future__ import annotations

import hashlib
import logging
import random

import numpy as np
import pytest
import torch

from elastic_hsgd import CheckpointManager, HierarchicalModelAverager
from elastic_hsgd.elastic import rank_seed, resume, seed_rank
from tests.distributed import run_workers

# -- the pure function -------------------------------------------------------------


def test_rank_seed_is_the_documented_hash_and_reproducible():
    digest = hashlib.sha256(b"elastic_hsgd.rank_seed/7/120/3").digest()
    assert rank_seed(7, 120, 3) == int.from_bytes(digest[:8], "big") & (2**63 - 1)
    assert rank_seed(7, 120, 3) == rank_seed(7, 120, 3)
    assert all(0 <= rank_seed(seed, 0, 0) < 2**63 for seed in (-5, 0, 2**70))


def test_rank_seed_differs_by_rank_step_and_seed():
    by_rank = {rank_seed(0, 50, rank) for rank in range(64)}
    by_step = {rank_seed(0, step, 1) for step in range(64)}
    by_seed = {rank_seed(seed, 50, 1) for seed in range(64)}
    assert len(by_rank) == len(by_step) == len(by_seed) == 64
    # Not a simple offset: (seed, step + 1) and (seed + 1, step) are unrelated.
    assert rank_seed(0, 1, 0) != rank_seed(1, 0, 0) and rank_seed(0, 0, 1) != rank_seed(0, 1, 0)


@pytest.mark.parametrize("bad", [{"seed": 1.5}, {"step": -1}, {"rank": -2}, {"rank": True}, {"step": "3"}])
def test_rank_seed_refuses_bad_input_naming_it(bad):
    args = {"seed": 0, "step": 0, "rank": 0, **bad}
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        rank_seed(**args)


def test_seed_rank_seeds_torch_python_and_numpy():
    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    seed_rank(rank_seed(0, 10, 1))
    first = draws()
    seed_rank(rank_seed(0, 10, 1))
    assert draws() == first
    seed_rank(rank_seed(0, 10, 2))
    assert all(a != b for a, b in zip(draws(), first))


# -- resume in one process ------------------------------------------------------------


def _state(url):
    torch.manual_seed(0)  # every rank builds the same model, as a script does
    model = torch.nn.Linear(4, 2)
    averager = HierarchicalModelAverager({2: "world"}, warmup_steps=0)
    return CheckpointManager(url), {"model": model, "averager": averager}, averager


def test_fresh_start_reseeds_and_logs_same_world_resume_restores(single_process_group, tmp_path, caplog):
    manager, state, averager = _state(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="elastic_hsgd.elastic"):
        resume(manager, state, averager, seed=7)
    expected = rank_seed(7, 0, 0)
    assert f"reseeded rank 0: torch seed {expected} from (seed 7, step 0, rank 0)" in caplog.text
    drawn = torch.rand(3)
    seed_rank(expected)
    assert torch.equal(drawn, torch.rand(3))

    manager.save(0, state)
    after_save = torch.rand(3)
    manager, state, averager = _state(str(tmp_path))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="elastic_hsgd.elastic"):
        resume(manager, state, averager, seed=7)
    assert "reseeded" not in caplog.text  # same world: the saved stream goes on
    assert torch.equal(torch.rand(3), after_save)


def test_seed_none_takes_torch_initial_seed_and_reseed_false_keeps_the_stream(single_process_group, tmp_path):
    manager, state, averager = _state(str(tmp_path / "a"))  # torch.manual_seed(0) inside
    resume(manager, state, averager)
    drawn = torch.rand(3)
    seed_rank(rank_seed(0, 0, 0))
    assert torch.equal(drawn, torch.rand(3))

    manager, state, averager = _state(str(tmp_path / "b"))
    resume(manager, state, averager, reseed=False)
    torch_after_init = torch.rand(3)
    manager, state, averager = _state(str(tmp_path / "c"))
    assert torch.equal(torch_after_init, torch.rand(3))  # the stream left where model init put it


# -- world-size changes in real gloo worlds ---------------------------------------------


def _save_worker(rank: int, world_size: int, url: str) -> None:
    manager, state, averager = _state(url)
    resume(manager, state, averager, seed=3)
    manager.save(0, state)
    manager.close()


def _resume_worker(rank: int, world_size: int, url: str, same_world_url: str) -> dict:
    manager, state, averager = _state(url)
    resumed = resume(manager, state, averager, seed=3)
    drawn = torch.rand(4).tolist()
    manager.close()
    # A same-world resume is not reseeded: it continues the stream saved with the checkpoint.
    other, state, averager = _state(same_world_url)
    resume(other, state, averager, seed=3)
    other.save(0, state)
    continued = torch.rand(4).tolist()
    other, state, averager = _state(same_world_url)
    resume(other, state, averager, seed=3)
    other.close()
    return {
        "previous": resumed.previous_world_size, "drawn": drawn, "expected_seed": rank_seed(3, 0, rank),
        "continued": continued, "restored": torch.rand(4).tolist(),
    }


@pytest.mark.parametrize("saved_world", [1, 4])
def test_after_a_world_change_ranks_draw_different_reproducible_numbers(tmp_path, saved_world):
    url = str(tmp_path / "ckpt")
    run_workers(_save_worker, saved_world, url)
    first = run_workers(_resume_worker, 2, url, str(tmp_path / "same1"))
    second = run_workers(_resume_worker, 2, url, str(tmp_path / "same2"))
    assert [r["previous"] for r in first] == [saved_world, saved_world]
    assert first[0]["drawn"] != first[1]["drawn"]  # uncorrelated ranks
    assert [r["drawn"] for r in first] == [r["drawn"] for r in second]  # reproducible
    for rank, result in enumerate(first):
        generator = torch.Generator().manual_seed(result["expected_seed"])
        assert result["drawn"] == torch.rand(4, generator=generator).tolist()
        assert result["restored"] == result["continued"]  # same world: restored, not reseeded
