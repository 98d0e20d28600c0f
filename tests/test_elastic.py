"""elastic.py helpers in one process: the hook counter travels with the averager."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from elastic_hsgd import CheckpointManager, HierarchicalModelAverager
from elastic_hsgd.elastic import attach_post_local_sgd, next_generation, resume


def _build(warmup: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    averager = HierarchicalModelAverager({2: "world"}, warmup_steps=warmup)
    hook = attach_post_local_sgd(ddp, averager)
    assert hook.hook_state.start_localSGD_iter == warmup  # tied by construction
    return ddp, optimizer, averager, {"model": model, "optimizer": optimizer, "averager": averager, "post_local_sgd": hook}


def test_hook_counter_and_averager_step_resume_together(single_process_group, tmp_path):
    ddp, optimizer, averager, state = _build(warmup=3)
    for _ in range(5):
        optimizer.zero_grad()
        ddp(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        averager.average_parameters(ddp.parameters())
    assert state["post_local_sgd"].hook_state.iter == 3  # torch's hook stops counting after warmup
    manager = CheckpointManager(str(tmp_path))
    manager.save(5, state)

    _, _, averager2, state2 = _build(warmup=3)
    resumed = resume(manager, state2, averager2)
    assert (resumed.step, resumed.previous_world_size) == (5, 1)
    assert averager2.step == 5 and state2["post_local_sgd"].hook_state.iter == 3

    _, _, _, mismatched = _build(warmup=4)
    with pytest.raises(ValueError, match="warmup"):
        manager.load(5, mismatched)


def test_generation_increases_on_every_start(single_process_group, tmp_path):
    manager = CheckpointManager(str(tmp_path))
    assert [next_generation(manager) for _ in range(3)] == [0, 1, 2]


def test_a_step_0_checkpoint_resumes_at_step_0_and_is_not_a_fresh_start(single_process_group, tmp_path):
    manager = CheckpointManager(str(tmp_path))
    _, _, averager, state = _build(warmup=3)
    fresh = resume(manager, state, averager)
    assert (fresh.step, fresh.checkpoint, fresh.previous_world_size) == (0, None, None)
    manager.save(0, state)  # label 0: no optimizer step done yet
    assert manager.load_latest(state) == 0  # not None: a step-0 checkpoint exists
    _, _, averager2, state2 = _build(warmup=3)
    resumed = resume(manager, state2, averager2)
    assert (resumed.step, resumed.checkpoint, resumed.previous_world_size) == (0, 0, 1)
