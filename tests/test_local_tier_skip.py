"""The node-local tier never makes training wait for a save: a due save is skipped while the previous one
is written (a rank a full interval ahead of the slowest waits for it instead, so skew skips nothing), and a
save that would not fit its folder is skipped with a WARNING (issue 19, items 8 and 9)."""

from __future__ import annotations

import logging

from tests.distributed import run_workers


def _collect_records(level: int = logging.DEBUG) -> list[tuple[int, str]]:
    """Every record the package logs in this process from now on, DEBUG included."""
    records: list[tuple[int, str]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelno, record.getMessage()))

    package = logging.getLogger("elastic_hsgd")
    package.setLevel(level)
    package.addHandler(Collect())
    return records


# -- pure: one verdict from every rank's report --------------------------------------------------


def test_verdict_skips_for_every_rank_when_one_was_still_saving_or_a_folder_would_not_fit():
    from elastic_hsgd.checkpoint.tiers.local_gate import space_problems, verdict

    nodes, buddies = [0, 0, 1, 1], [2, 3, 0, 1]
    ready = [(10, 100, None, None)] * 4
    assert verdict(ready, nodes, buddies, limit=None) is None
    busy = [*ready[:2], (10, None, None, None), ready[3]]
    kind, message = verdict(busy, nodes, buddies, limit=None)
    assert kind == "busy" and "rank(s) [2]" in message
    # Each node holds its two ranks' files and the two copies it keeps for the other node: 400 bytes.
    leads = [(10, 100, 10_000, 250), (10, 100, None, None), (10, 100, 399, 0), (10, 100, None, None)]
    kind, message = verdict(leads, nodes, buddies, limit=600)
    assert kind == "space"
    assert space_problems(leads, nodes, buddies, limit=600) == [
        "node 0's folder would hold 650 bytes (250 held + 400 for this step), over local_size_limit=600",
        "node 1 needs 400 bytes for this step, 399 are free at its folder",
    ]
    assert verdict([(10, 1, None, None), (11, 1, None, None)], [0, 1], [1, 0], None)[0] == "mismatch"


# -- 2 real gloo processes, one per "node" ---------------------------------------------------------


def _skip_worker(rank: int, world_size: int, root: str) -> dict:
    import os
    import threading
    import time
    from pathlib import Path

    import torch

    from elastic_hsgd import CheckpointManager
    from elastic_hsgd.checkpoint.layout import step_dir_name
    from tests import faulty_fs

    faulty_fs.register()
    os.environ["GROUP_RANK"] = str(rank)
    marker = Path(root) / "parked"
    # Rank 0's own file of step 2 parks mid-write until the release file appears.
    os.environ[faulty_fs.BLOCK_MATCH_ENV] = f"node0/{step_dir_name(2)}/rank_"
    os.environ[faulty_fs.BLOCK_MARKER_ENV] = str(marker)
    records = _collect_records()
    manager = CheckpointManager(f"{root}/cloud", local_url=f"blockingfile://{root}/node{rank}", local_every=1)
    state = {"model": torch.nn.Linear(4, 4)}
    outcome: dict = {"first": manager.maybe_save(1, state)}
    manager.local.wait()
    outcome["first_committed"] = manager.local_committed_step
    outcome["parked"] = manager.maybe_save(2, state)
    end = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < end, "rank 0's write of step 2 never started"
        time.sleep(0.01)
    if rank == 0:
        threading.Timer(3.0, marker.with_name(marker.name + ".release").touch).start()
    started = time.monotonic()
    outcome["due_while_busy"] = [manager.maybe_save(step, state) for step in (3, 4)]
    outcome["busy_s"] = time.monotonic() - started
    manager.local.wait()  # returns once the parked write is released
    outcome["after_release"] = manager.local_committed_step
    outcome["next"] = manager.maybe_save(5, state)
    manager.local.wait()
    outcome["committed"] = manager.local_committed_step
    outcome["skipped"] = manager.local.skipped
    outcome["kept"] = sorted(n for n in os.listdir(f"{root}/node{rank}") if n.startswith("step_"))
    manager.close()
    outcome["records"] = records
    return outcome


def test_a_due_local_save_is_skipped_not_waited_for_while_the_previous_one_runs(tmp_path):
    results = run_workers(_skip_worker, 2, str(tmp_path), deadline_s=150)
    for rank, r in enumerate(results):
        assert r["first"] == ("local",) and r["first_committed"] == 1 and r["parked"] == ("local",), r
        assert r["due_while_busy"] == [(), ()], r["due_while_busy"]
        assert r["busy_s"] < 1.5, f"rank {rank} waited {r['busy_s']:.1f} s for the previous local save"
        assert r["after_release"] == 2
        assert r["next"] == ("local",) and r["committed"] == 5  # the first save due after it finished happens
        assert r["skipped"] == 2
        assert r["kept"] == ["step_000000000002", "step_000000000005"]
    records = results[0]["records"]
    debug = [m for level, m in records if level == logging.DEBUG and "skipped" in m]
    assert any("step 3" in m for m in debug) and any("step 4" in m for m in debug), records
    assert any(level == logging.INFO and "skipped 2 of 5 due local saves" in m for level, m in records), records


def _skew_worker(rank: int, world_size: int, root: str) -> dict:
    import os
    import time
    from pathlib import Path

    import torch

    from elastic_hsgd import CheckpointManager

    os.environ["GROUP_RANK"] = str(rank)
    manager = CheckpointManager(f"{root}/cloud", local_url=f"{root}/node{rank}", local_every=1)
    state = {"model": torch.nn.Linear(4, 4)}
    saved = [manager.maybe_save(1, state)]
    manager.local.wait()
    entered = Path(root) / "rank0-entered-step-3"
    late_from = None
    if rank == 1:
        # Rank 1 reaches step 2 only once rank 0 is inside step 3's save: rank 0 is a full interval ahead.
        end = time.monotonic() + 60
        while not entered.exists():
            assert time.monotonic() < end, "rank 0 never reached step 3"
            time.sleep(0.01)
        late_from = time.monotonic()
    saved.append(manager.maybe_save(2, state))
    if rank == 1:
        manager.local.wait()  # rank 1 is not ahead: its save of step 2 is done before step 3
    else:
        entered.touch()
    saved.append(manager.maybe_save(3, state))  # rank 0: its save of step 2 still waits for rank 1
    returned = time.monotonic()  # one system-wide clock: comparable across the two processes
    manager.local.wait()
    outcome = {"saved": saved, "late_from": late_from, "returned": returned, "committed": manager.local_committed_step, "skipped": manager.local.skipped}
    manager.close()
    return outcome


def test_a_rank_a_full_interval_ahead_waits_for_the_slowest_so_skew_skips_no_save(tmp_path):
    ahead, behind = run_workers(_skew_worker, 2, str(tmp_path), deadline_s=150)
    for r in (ahead, behind):
        assert r["saved"] == [("local",)] * 3 and r["committed"] == 3 and r["skipped"] == 0, r
    # rank 0's step-3 save returned only after rank 1 set out for step 2, as the next averaging step would
    assert ahead["returned"] > behind["late_from"], (ahead, behind)


def _space_worker(rank: int, world_size: int, root: str) -> dict:
    import os
    import shutil

    import torch

    from elastic_hsgd import CheckpointManager

    os.environ["GROUP_RANK"] = str(rank)
    records = _collect_records()
    state = {"model": torch.nn.Linear(64, 64)}  # about 30 KB per rank file, twice that per node folder
    outcome = {}

    def save(phase: str, **options) -> None:
        folder = f"{root}/{phase}-node{rank}"
        manager = CheckpointManager(f"{root}/cloud-{phase}", local_url=folder, local_every=1, **options)
        outcome[phase] = (manager.maybe_save(1, state), manager.local.wait(), manager.local_committed_step)[::2]
        outcome[phase + "_kept"] = sorted(n for n in os.listdir(folder) if n.startswith("step_"))
        manager.close()

    save("limit", local_size_limit=10_000)
    if rank == 1:  # node 1's folder is on a nearly full filesystem
        real = shutil.disk_usage
        shutil.disk_usage = lambda path: real(path)._replace(free=1_000)
    save("full")
    if rank == 1:
        shutil.disk_usage = real
    save("fits", local_size_limit=10_000_000)
    outcome["warnings"] = [m for level, m in records if level >= logging.WARNING]
    return outcome


def test_a_local_save_that_would_not_fit_its_folder_is_skipped_with_a_warning(tmp_path):
    results = run_workers(_space_worker, 2, str(tmp_path), deadline_s=150)
    for r in results:
        assert r["limit"] == (("local",), None) and r["limit_kept"] == [], r
        assert r["full"] == (("local",), None) and r["full_kept"] == [], r
        assert r["fits"] == (("local",), 1) and r["fits_kept"] == ["step_000000000001"], r
    text = "\n".join(results[0]["warnings"])
    assert "local checkpoint of step 1 skipped" in text and "over local_size_limit=10000" in text, text
    assert "node 1 needs" in text and "1000 are free" in text, text


# -- pure: the CPU budget -----------------------------------------------------------------------


def test_the_cpu_budget_spaces_expensive_saves_and_never_holds_back_cheap_ones():
    from elastic_hsgd.checkpoint.tiers.local_cadence import BURST, FRACTION, Cadence
    from elastic_hsgd.checkpoint.tiers.local_gate import decode_reports, encode_report

    # Steps of seconds: every due step is saved, however often.
    slow = Cadence(every=5)
    assert [slow.update(step, wall_s=5.0, cpu_s=0.02, step_s=1.0) for step in (5, 10, 15)] == [10, 15, 20]
    # 7 ms steps, 20 ms saves: once the burst is spent, saves take at most FRACTION of the wall time.
    fast, step, spent, wall_s = Cadence(every=5), 5, 0.0, 0.0
    for _ in range(200):
        nxt = fast.update(step, wall_s=0.0 if step == 5 else 0.007 * (step - prev), cpu_s=0.02, step_s=0.007)
        spent, wall_s, prev, step = spent + 0.02, wall_s + 0.007 * (nxt - step), step, nxt
    wall = wall_s
    assert spent <= FRACTION * wall + BURST + 0.02, (spent, wall)
    assert step % 5 == 0
    # One gather gives every rank the same inputs (rank 0's clock, the most CPU any rank spent).
    gathered = [encode_report((10, 100, None, None), 0.01, 0.5, 0.007), encode_report((10, 100, None, None), 0.03, 0.4, 0.009)]
    reports, cpu, wall_s, step_s = decode_reports(gathered)
    assert reports == [(10, 100, None, None)] * 2 and (cpu, wall_s, step_s) == (0.03, 0.5, 0.007)


def test_a_save_is_charged_the_cpu_of_every_thread_but_the_training_one():
    import threading
    import time

    from elastic_hsgd.checkpoint.tiers.local_cadence import cpu_outside, training_clock

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds  # CPU seconds, however busy the machine is
        while time.thread_time() < end:
            pass

    clock = training_clock()
    assert clock is not None  # Linux: per-thread CPU clocks
    before = cpu_outside(clock)
    spin(0.3)  # the training thread's own work is not the save's cost
    assert cpu_outside(clock) - before < 0.1
    helper = threading.Thread(target=spin, args=(0.3,))  # a save thread, or gloo's, working beside training
    helper.start()
    helper.join()
    assert cpu_outside(clock) - before >= 0.29
