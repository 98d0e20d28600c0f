"""Nothing committed is lost, nothing of another run is resumed (issue 19 items 1-4, 6, 7; issue 20 item 2).

In one process where the rule is rank 0's (retention, re-saves, generations), with real gloo
processes where it is collective (the run identity of the local tier, a refused save, node ids).
"""

from __future__ import annotations

import os
import shutil
import textwrap
import threading

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from elastic_hsgd import CheckpointManager
from elastic_hsgd.checkpoint import CheckpointError
from elastic_hsgd.checkpoint.layout import COMMIT_NAME, step_dir_name
from elastic_hsgd.checkpoint.verify import verify_step
from tests.distributed import collect_package_warnings as _collect_package_warnings, run_workers


def _state(value: float) -> dict:
    return {"weights": torch.full((4,), value)}


# -- 19.1: a node-local folder of another run is never resumed ---------------------------------------


def _foreign_local_worker(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist

    os.environ["GROUP_RANK"] = str(rank)  # one rank per "node", each with its own folder
    warnings = _collect_package_warnings()
    out: dict = {}

    def manager(cloud: str, local: str) -> CheckpointManager:
        return CheckpointManager(f"{root}/{cloud}", every=10, local_url=f"{root}/{local}{rank}", local_every=5)

    def train_and_close(cloud: str, local: str) -> None:
        m = manager(cloud, local)
        for step in (5, 10, 15):
            m.maybe_save(step, _state(float(step)))
            m.local.wait()  # committed before the next is due (a local save due while one runs is skipped)
        m.close()

    # Job A: cloud step 10, local steps 10 and 15; its own restart resumes local 15.
    train_and_close("cloudA", "node")
    restart = manager("cloudA", "node")
    state = _state(0.0)
    out["restart"] = (restart.load_latest(state), restart.last_source, state["weights"][0].item())
    restart.close()
    dist.barrier()

    # Job B: a new cloud URL, a fresh model, the same node folders: nothing to resume.
    del warnings[:]
    b = manager("cloudB", "node")
    state = _state(-1.0)
    out["other_job"] = (b.load_latest(state), state["weights"][0].item())
    out["other_job_warnings"] = list(warnings)
    b.close()
    dist.barrier()

    # Job C saves, then its cloud steps are deleted (RUN_ID kept) and the URL is reused.
    train_and_close("cloudC", "nodeC")
    if rank == 0:
        for name in os.listdir(f"{root}/cloudC"):
            if name.startswith("step_"):
                shutil.rmtree(f"{root}/cloudC/{name}")
    dist.barrier()
    del warnings[:]
    reused = manager("cloudC", "nodeC")
    state = _state(-1.0)
    out["reused"] = (reused.load_latest(state), state["weights"][0].item())
    out["reused_warnings"] = list(warnings)
    reused.close()
    return out


def test_a_local_step_of_another_run_is_never_loaded(tmp_path):
    results = run_workers(_foreign_local_worker, 2, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["restart"] == (15, "local", 15.0), r  # the run's own restart still uses its local tier
        assert r["other_job"] == (None, -1.0), r
        assert r["reused"] == (None, -1.0), r
    for rank in (0, 1):  # each node names its own folder and the step it refused
        folder = str(tmp_path / f"node{rank}")
        assert any(folder in w and "step 15" in w and "another run" in w for w in results[rank]["other_job_warnings"]), results[rank]
        folder = str(tmp_path / f"nodeC{rank}")
        assert any(folder in w and "step 15" in w for w in results[rank]["reused_warnings"]), results[rank]


# -- 19.2: retention never deletes what another writer committed after this run loaded -------------


def test_retention_keeps_steps_another_writer_committed_after_the_load(tmp_path):
    url = str(tmp_path / "ckpt")
    CheckpointManager(url).save(500, _state(500.0))
    a, b = CheckpointManager(url, keep=3), CheckpointManager(url, keep=3)
    assert a.load_latest(_state(0.0)) == 500 and b.load_latest(_state(0.0)) == 500
    for step in (525, 550, 575):
        a.save(step, _state(float(step)))
    b.save(600, _state(600.0))  # B is the next torchft writer
    assert b.steps() == [550, 575, 600]


# -- 19.3: a fresh run never deletes the steps it finds ----------------------------------------------


def test_a_fresh_run_refuses_to_save_over_committed_steps_unless_told_to(tmp_path):
    url = str(tmp_path / "ckpt")
    CheckpointManager(url).save(5000, _state(5000.0))
    fresh = CheckpointManager(url)
    with pytest.raises(CheckpointError) as refused:
        fresh.save(100, _state(100.0))
    message = str(refused.value)
    assert "5000" in message and "load_latest" in message and "overwrite=True" in message and url in message
    assert fresh.steps() == [5000]
    state = _state(0.0)
    assert CheckpointManager(url).load_latest(state) == 5000 and state["weights"][0].item() == 5000.0
    # After a load the run has a timeline, and saves go on as before.
    resumed = CheckpointManager(url)
    assert resumed.load_latest(_state(0.0)) == 5000
    resumed.save(5100, _state(5100.0))
    assert resumed.steps() == [5000, 5100]
    # overwrite=True: the user says this run replaces the location's timeline.
    replacing = CheckpointManager(url, overwrite=True)
    replacing.save(100, _state(100.0))
    assert replacing.steps() == [100]


def _refused_everywhere_worker(rank: int, world_size: int, root: str) -> str:
    CheckpointManager(root).save(7, _state(7.0))
    fresh = CheckpointManager(root)
    try:
        fresh.save(3, _state(3.0))
    except CheckpointError as exc:
        return str(exc)
    finally:
        fresh.close()
    return ""


def test_the_refused_save_raises_on_every_rank(tmp_path):
    messages = run_workers(_refused_everywhere_worker, 2, str(tmp_path / "ckpt"))
    assert all("step 7" in m and "overwrite=True" in m for m in messages), messages


# -- 19.4: a re-save replaces a committed step only once the new one is committed ------------------


class _FailingWrites(LocalFileSystem):
    """A local folder whose writes of paths containing ``fail_matching`` fail."""

    protocol = ("failingwrites",)
    fail_matching = ""

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode and type(self).fail_matching and type(self).fail_matching in str(path):
            raise PermissionError(f"injected: writing {path} failed")
        return super()._open(path, mode, **kwargs)


@pytest.mark.parametrize("failing", ["rank_00000", COMMIT_NAME])
def test_a_failed_re_save_keeps_the_committed_step(tmp_path, failing):
    fsspec.register_implementation("failingwrites", _FailingWrites, clobber=True)
    url = f"failingwrites://{tmp_path}/ckpt"
    manager = CheckpointManager(url, retries=0)
    manager.save(5, _state(1.0))
    _FailingWrites.fail_matching = failing
    try:
        with pytest.raises(CheckpointError):
            manager.save(5, _state(2.0))
    finally:
        _FailingWrites.fail_matching = ""
    assert sorted(os.listdir(tmp_path / "ckpt" / step_dir_name(5))) == [COMMIT_NAME, "rank_00000.safetensors"]  # the attempt's are gone
    state = _state(0.0)
    assert CheckpointManager(url).load_latest(state) == 5 and state["weights"][0].item() == 1.0
    # A re-save that works replaces it, and leaves only the new files.
    manager.save(5, _state(3.0))
    state = _state(0.0)
    assert CheckpointManager(url).load(5, state) == 5 and state["weights"][0].item() == 3.0
    assert verify_step(manager.storage, manager.commit_record(5)) == []  # the CLI's verify reads the new files
    names = sorted(os.listdir(tmp_path / "ckpt" / step_dir_name(5)))
    assert COMMIT_NAME in names and len(names) == 2 and [n for n in names if n != COMMIT_NAME][0].startswith("rank_00000"), names


RESAVE_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from tests.faulty_fs import BLOCK_MATCH_ENV, register
    from elastic_hsgd import CheckpointManager
    register()
    manager = CheckpointManager("blockingfile://" + sys.argv[1])
    manager.save(5, {"weights": torch.full((4,), 1.0)})
    print("saved", flush=True)
    os.environ[BLOCK_MATCH_ENV] = "step_000000000005/rank_00000"
    manager.save(5, {"weights": torch.full((4,), 2.0)})  # parked mid-write, then killed
    print("re-saved", flush=True)
    """
)


def test_sigkill_during_a_re_save_keeps_the_committed_step(tmp_path):
    from tests.faulty_fs import BLOCK_MARKER_ENV, sigkill_when_parked

    url = tmp_path / "ckpt"
    marker = tmp_path / "mid-write"
    printed = sigkill_when_parked(RESAVE_KILL_SCRIPT, [str(url)], marker, {BLOCK_MARKER_ENV: str(marker)}, "the re-save never started")
    assert printed.split() == ["saved"]
    state = _state(0.0)
    assert CheckpointManager(str(url)).load_latest(state) == 5 and state["weights"][0].item() == 1.0


def test_load_of_an_older_step_hides_the_newer_ones_at_once(tmp_path):
    url = str(tmp_path / "ckpt")
    setup = CheckpointManager(url)
    for step in (100, 200, 300):
        setup.save(step, _state(float(step)))
    CheckpointManager(url).load(100, _state(0.0))  # ... and the run crashes before its next save
    restart = CheckpointManager(url)
    state = _state(0.0)
    assert restart.load_latest(state) == 100 and state["weights"][0].item() == 100.0
    assert restart.steps() == [100]
    # Until a save deletes them, loading one explicitly brings its timeline back.
    back = CheckpointManager(url)
    assert back.load(300, state) == 300 and back.steps() == [100, 200, 300]
    restart2 = CheckpointManager(url)
    assert restart2.load(100, state) == 100
    restart2.save(110, _state(110.0))
    assert restart2.steps() == [100, 110]
    assert sorted(n for n in os.listdir(url) if n.startswith("step_")) == [step_dir_name(100), step_dir_name(110)]


# -- 19.6: no silent world of one, no silent node 0 ---------------------------------------------------


def test_a_manager_built_before_init_process_group_in_a_world_of_four_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(RuntimeError, match="init_process_group") as raised:
        CheckpointManager(str(tmp_path / "ckpt"))
    assert "WORLD_SIZE=4" in str(raised.value)
    assert not (tmp_path / "ckpt").exists() or not any(n.startswith("step_") for n in os.listdir(tmp_path / "ckpt"))


def _node_worker(rank: int, world_size: int, root: str) -> dict:
    os.environ.pop("GROUP_RANK", None)
    os.environ.pop("ELASTIC_HSGD_NODE_RANK", None)
    warnings = _collect_package_warnings()
    out = {}
    guessed = CheckpointManager(f"{root}/cloud", local_url=f"{root}/node{rank}", local_every=1)
    out["guessed"] = guessed.local.nodes
    guessed.close()
    again = CheckpointManager(f"{root}/cloud", local_url=f"{root}/node{rank}", local_every=1)
    again.close()
    out["warnings"] = [w for w in warnings if "node" in w]
    del warnings[:]
    given = CheckpointManager(f"{root}/cloud", local_url=f"{root}/node{rank}", local_every=1, node=10 + rank)
    out["given"] = (given.local.nodes, given.local.buddies)
    given.close()
    os.environ["ELASTIC_HSGD_NODE_RANK"] = str(rank)
    from_env = CheckpointManager(f"{root}/cloud", local_url=f"{root}/node{rank}", local_every=1)
    out["from_env"] = from_env.local.nodes
    from_env.close()
    out["later_warnings"] = [w for w in warnings if "node" in w]
    return out


def test_without_a_node_id_the_local_tier_warns_once_and_takes_one_given(tmp_path):
    results = run_workers(_node_worker, 2, str(tmp_path))
    assert all(r["guessed"] == [0, 0] for r in results)
    assert len(results[0]["warnings"]) == 1, results[0]["warnings"]  # once, by rank 0
    warning = results[0]["warnings"][0]
    assert "GROUP_RANK" in warning and "ELASTIC_HSGD_NODE_RANK" in warning and "node=" in warning
    assert results[1]["warnings"] == []
    for r in results:
        assert r["given"] == ([10, 11], [1, 0])
        assert r["from_env"] == [0, 1]
        assert r["later_warnings"] == []


# -- 19.7: two starts at once get different generations -----------------------------------------------


class _RacingReads(LocalFileSystem):
    """Every read of a generation file waits for a second reader (up to 2 s): the unlucky interleaving, always."""

    protocol = ("racingreads",)
    barrier = threading.Barrier(2, timeout=2.0)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode and "GENERATION" in str(path):
            try:
                type(self).barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return super()._open(path, mode, **kwargs)


def test_two_starts_at_once_get_different_generations(tmp_path):
    from elastic_hsgd.elastic import GENERATION_FILE, next_generation

    fsspec.register_implementation("racingreads", _RacingReads, clobber=True)
    url = f"racingreads://{tmp_path}/ckpt"
    managers = [CheckpointManager(url) for _ in range(2)]
    _RacingReads.barrier = threading.Barrier(1)
    assert next_generation(managers[0]) == 0
    _RacingReads.barrier = threading.Barrier(2, timeout=2.0)
    got: list[int] = []
    threads = [threading.Thread(target=lambda m=m: got.append(next_generation(m))) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [1, 2]
    assert (tmp_path / "ckpt" / GENERATION_FILE).exists()
    _RacingReads.barrier = threading.Barrier(1)
    assert next_generation(managers[0]) == 3


# -- 20.2: the label is the averager's step -------------------------------------------------------------


def test_a_save_label_other_than_the_averager_step_is_refused(single_process_group, tmp_path):
    from elastic_hsgd import HierarchicalModelAverager

    model = torch.nn.Linear(3, 2)
    averager = HierarchicalModelAverager({2: "world"}, warmup_steps=0)
    state = {"model": model, "averager": averager}
    manager = CheckpointManager(str(tmp_path / "ckpt"), every=1)
    for _ in range(3):
        model.weight.grad = torch.ones_like(model.weight)
        model.bias.grad = torch.ones_like(model.bias)
        averager.average_parameters(model.parameters())
    assert averager.step == 3
    for call in (lambda: manager.save(2, state), lambda: manager.maybe_save(2, state)):
        with pytest.raises(ValueError) as refused:
            call()
        message = str(refused.value)
        assert "2" in message and "3" in message and "step + 1" in message and "averager" in message
    assert manager.steps() == []
    manager.save(3, state)
    assert manager.maybe_save(3, state) == ("cloud",) and manager.steps() == [3]


def test_exclusive_create_lets_one_writer_win_on_every_kind_of_storage(checkpoint_url):
    from elastic_hsgd.checkpoint.run_identity import ensure_run_id
    from elastic_hsgd.checkpoint.storage import Storage

    url, options = checkpoint_url
    storage = Storage(url, options)
    path = storage.path("claims", "first")
    assert storage.create(path, b"mine") is True
    assert storage.create(path, b"theirs") is False
    assert storage.read_file(path) == b"mine"
    run_id = ensure_run_id(storage)
    assert ensure_run_id(Storage(url, options)) == run_id and len(run_id) == 32
