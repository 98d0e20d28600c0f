"""The node-local tier: buddy placement and load plans (pure), then 4 real gloo processes on 2 "nodes"."""

from __future__ import annotations


import pytest

from elastic_hsgd.checkpoint.layout import CommitRecord, FileEntry, rank_file_name, saved_ranks_to_read
from elastic_hsgd.checkpoint.local_tier import BUDDY, OWN, StepHolding, buddy_ranks, plan_load
from tests.distributed import collect_package_warnings as _collect_package_warnings, run_workers


def test_buddy_is_on_another_node_when_there_is_one():
    assert buddy_ranks([0, 0, 1, 1]) == [2, 3, 0, 1]
    assert buddy_ranks([5, 5, 2, 2]) == [2, 3, 0, 1]  # node ids are labels, not positions
    assert buddy_ranks([0, 0, 0, 1]) == [3, 3, 3, 0]  # uneven nodes: every copy still leaves its node
    assert buddy_ranks([0, 1, 2]) == [1, 2, 0]


def test_buddy_on_one_node_is_the_next_rank_and_alone_there_is_none():
    assert buddy_ranks([0, 0, 0]) == [1, 2, 0]
    assert buddy_ranks([3]) == [None]


def _record(step: int, world: int, tag: str = "a", unix_time: float = 0.0) -> CommitRecord:
    files = tuple(FileEntry(rank_file_name(r), f"crc32:{tag}{r}", 10) for r in range(world))
    return CommitRecord(step=step, world_size=world, files=files, unix_time=unix_time)


def _same_rank(rank: int, saved_world: int, world: int) -> list[int]:
    return saved_ranks_to_read(rank, world, saved_world) or [rank % saved_world]


def _holding(record, own, buddy) -> StepHolding:
    return StepHolding(record, frozenset(own), frozenset(buddy))


def test_plan_reads_own_copies_when_every_node_has_them():
    rec = _record(10, 4)
    node0, node1 = _holding(rec, {0, 1}, {2, 3}), _holding(rec, {2, 3}, {0, 1})
    plan = plan_load(10, [0, 0, 1, 1], [{10: node0}, {10: node0}, {10: node1}, {10: node1}], _same_rank)
    assert plan is not None and plan.source == "local"
    assert [(r.rank, r.saved_rank, r.holder, r.copy) for r in plan.reads] == [(r, r, r, OWN) for r in range(4)]


def test_plan_uses_buddy_copies_after_a_lost_node_and_excludes_bad_copies():
    rec = _record(10, 4)
    survivor = _holding(rec, {0, 1}, {2, 3})
    # World 4 again after a new node joined with an empty folder: ranks 2, 3 get node 0's buddy copies sent over.
    plan = plan_load(10, [0, 0, 7, 7], [{10: survivor}, {10: survivor}, {}, {}], _same_rank)
    assert plan is not None and plan.source == "buddy"
    assert [(r.saved_rank, r.holder, r.copy) for r in plan.reads[2:]] == [(2, 0, BUDDY), (3, 1, BUDDY)]
    # Rank 1's own copy is bad: its buddy copy on node 1 is read there and sent.
    both = [{10: _holding(rec, {0, 1}, {2, 3})}] * 2 + [{10: _holding(rec, {2, 3}, {0, 1})}] * 2
    plan = plan_load(10, [0, 0, 1, 1], both, _same_rank, exclude={(0, 10, 1, OWN)})
    assert plan is not None and plan.reads[1] == type(plan.reads[1])(1, 1, 3, BUDDY)
    # Both copies bad: no local plan (the caller falls back to the cloud).
    assert plan_load(10, [0, 0, 1, 1], both, _same_rank, exclude={(0, 10, 1, OWN), (1, 10, 1, BUDDY)}) is None


def test_plan_never_mixes_two_versions_of_a_step():
    old, new = _record(10, 2, "old", unix_time=1.0), _record(10, 2, "new", unix_time=2.0)
    holdings = [{10: _holding(old, {0}, set())}, {10: _holding(new, {1}, set())}]
    assert plan_load(10, [0, 1], holdings, _same_rank) is None
    holdings = [{10: _holding(new, {0}, {1})}, {10: _holding(old, {1}, {0})}]
    plan = plan_load(10, [0, 1], holdings, _same_rank)  # both complete: the newer version wins
    assert plan is not None and plan.record == new and plan.reads[1].holder == 0


def test_manager_rejects_a_local_url_without_its_cadence(tmp_path):
    from elastic_hsgd import CheckpointManager

    with pytest.raises(ValueError, match="local_every=None: give both"):
        CheckpointManager(str(tmp_path / "c"), local_url=str(tmp_path / "l"))
    with pytest.raises(ValueError, match="local_every=0"):
        CheckpointManager(str(tmp_path / "c"), local_url=str(tmp_path / "l"), local_every=0)


# -- 4 real gloo processes, 2 per "node", each node with its own local folder ----------------------


def _fallback_worker(rank: int, world_size: int, root: str) -> dict:
    import os

    import torch
    import torch.distributed as dist

    from elastic_hsgd import CheckpointManager
    from elastic_hsgd.checkpoint.layout import step_dir_name

    os.environ["GROUP_RANK"] = str(rank // 2)
    warnings = _collect_package_warnings()
    node_url = f"{root}/node{rank // 2}"
    torch.manual_seed(rank)
    model = torch.nn.Linear(6, 3)
    manager = CheckpointManager(f"{root}/cloud", every=10, local_url=node_url, local_every=5, local_keep=2)
    state = {"model": model}
    saved = {}
    for step in (5, 10, 15):
        with torch.no_grad():
            model.weight.add_(step + rank)
        assert manager.maybe_save(step, state) == (("cloud", "local") if step == 10 else ("local",))
        manager.local.wait()  # back to back: a local save due while the previous one runs would be skipped
        saved[step] = model.weight.detach().clone()
    manager.local.wait()
    committed = manager.local_committed_step
    kept = sorted(os.listdir(node_url))
    results = {"committed": committed, "kept": kept}

    def load() -> tuple[int | None, str | None, bool]:
        with torch.no_grad():
            model.weight.zero_()
        step = manager.load_latest(state)
        return step, manager.last_source, bool(torch.equal(model.weight, saved[step])) if step else False

    results["intact"] = load()
    dist.barrier()
    if rank == 1:  # rank 1's own copy (node 0) is corrupted: its buddy copy lives on node 1, on rank 3
        with open(f"{root}/node0/{step_dir_name(15)}/{rank_file_name(1)}", "r+b") as f:
            f.seek(-3, 2)
            f.write(b"xyz")
    dist.barrier()
    results["own_corrupt"] = load()
    dist.barrier()
    if rank == 1:  # and its buddy copy is gone: step 15 is not complete locally; 10 is in the cloud and locally
        os.remove(f"{root}/node1/{step_dir_name(15)}/buddy/{rank_file_name(1)}")
        os.remove(f"{root}/node0/{step_dir_name(10)}/{rank_file_name(1)}")
        os.remove(f"{root}/node1/{step_dir_name(10)}/buddy/{rank_file_name(1)}")
    dist.barrier()
    results["both_gone"] = load()
    results["warnings"] = warnings
    manager.close()
    return results


def test_corrupt_or_missing_local_copy_falls_back_to_the_buddy_then_the_cloud(tmp_path):
    results = run_workers(_fallback_worker, 4, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["committed"] == 15
        assert r["kept"] == ["step_000000000010", "step_000000000015"]  # local_keep=2
        assert r["intact"] == (15, "local", True)
        assert r["own_corrupt"] == (15, "buddy", True)
        assert r["both_gone"] == (10, "cloud", True)
    text = "\n".join(results[0]["warnings"])
    assert f"{rank_file_name(1)} is corrupt" in "\n".join(results[1]["warnings"])
    assert "trying other copies" in text and "using buddy copies" in text
    assert "local tier cannot provide step 15 for every rank" in text
    assert "loading it from the cloud tier" in text


def test_close_releases_the_tier_group_once_and_closed_tier_refuses_to_save(tmp_path, single_process_group):
    import torch
    import torch.distributed as dist

    from elastic_hsgd import CheckpointManager
    from elastic_hsgd.checkpoint.storage import CheckpointError

    manager = CheckpointManager(str(tmp_path / "cloud"), local_url=str(tmp_path / "local"), local_every=1)
    tier = manager.local
    assert tier is not None and tier._group is not None
    group = tier._group
    manager.maybe_save(1, {"model": torch.nn.Linear(2, 2)})
    manager.close()
    manager.close()  # idempotent
    assert tier._group is None and tier._executor is None
    # Destroyed, so its gloo threads are joined before the interpreter finalizes.
    assert group not in dist.distributed_c10d._world.pg_map
    tier.close()
    with pytest.raises(CheckpointError, match="closed"):
        tier.save(2, {}, None, None)


def _storage_failure_worker(rank: int, world_size: int, root: str) -> dict:
    import os

    import torch

    from elastic_hsgd import CheckpointManager
    from elastic_hsgd.checkpoint.layout import step_dir_name

    os.environ["GROUP_RANK"] = str(rank)  # one rank per "node"
    warnings = _collect_package_warnings()
    node_url = f"{root}/node{rank}"
    manager = CheckpointManager(f"{root}/cloud", local_url=node_url, local_every=5)
    state = {"model": torch.nn.Linear(3, 2)}
    outcome = {}
    for step in (5, 10, 15):
        if step == 10 and rank == 1:  # a file where node 1's step-10 folder goes: every write there fails
            with open(f"{node_url}/{step_dir_name(10)}", "w") as f:
                f.write("in the way")
        manager.maybe_save(step, state)
        manager.local.wait()  # an agreed storage failure is logged, not raised
        outcome[step] = manager.local_committed_step
    manager.close()
    return {"committed": outcome, "warnings": warnings}


def test_a_storage_failure_every_rank_agrees_on_is_logged_and_the_tier_saves_on(tmp_path):
    results = run_workers(_storage_failure_worker, 2, str(tmp_path))
    for r in results:
        assert r["committed"] == {5: 5, 10: 5, 15: 15}, r
        assert any("local checkpoint of step 10" in w and "the cloud tier is unaffected" in w for w in r["warnings"]), r["warnings"]
