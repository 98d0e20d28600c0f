"""Checkpoint layout logic, without storage or processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_hsgd.checkpoint.layout import MAX_WORLD_SIZE, CommitRecord, FileEntry, parse_step_dir, plan_retention, saved_ranks_to_read, step_dir_name, structure_rank


def test_step_dir_names_sort_by_step_and_parse_back():
    names = [step_dir_name(s) for s in (9, 10, 100)]
    assert names == sorted(names)
    assert [parse_step_dir(n) for n in names] == [9, 10, 100]
    assert parse_step_dir("s3://b/run/step_000000000042/") == 42
    assert parse_step_dir("step_42") is None and parse_step_dir(".probe-x") is None
    with pytest.raises(ValueError, match="-1"):
        step_dir_name(-1)


def test_each_saved_rank_is_read_once_at_a_new_world_size_and_own_file_at_the_same():
    assert [saved_ranks_to_read(r, 4, 4) for r in range(4)] == [[0], [1], [2], [3]]
    assert [saved_ranks_to_read(r, 2, 4) for r in range(2)] == [[0, 2], [1, 3]]
    assert [saved_ranks_to_read(r, 4, 2) for r in range(4)] == [[0], [1], [], []]
    assert [structure_rank(r, 4, 2) for r in range(4)] == [0, 1, 0, 1]
    for new, old in [(3, 8), (8, 3), (1, 5), (5, 1)]:
        shares = [s for r in range(new) for s in saved_ranks_to_read(r, new, old)]
        assert sorted(shares) == list(range(old))
    with pytest.raises(ValueError, match="rank 4 of world 4"):
        saved_ranks_to_read(4, 4, 2)


@pytest.mark.parametrize("keep, dropped", [(1, [100, 150, 200]), (3, [200])])
def test_retention_after_a_fall_back_past_a_corrupt_newest_step(keep, dropped):
    # Step 200 was corrupt: the run resumed from 150 and just saved 160.
    assert plan_retention([100, 150, 160, 200], [100, 150, 160, 200], keep, just_committed=160, previous=150) == (dropped, [])
    # The case: the save just made survives its own retention.
    assert 150 not in plan_retention([100, 150, 200], [], keep=1, just_committed=150)[0]


@pytest.mark.parametrize("keep, dropped", [(1, [100, 150, 200]), (3, [150, 200])])
def test_retention_after_a_rollback_to_an_older_step(keep, dropped):
    # load(100) of [100, 150, 200], then a save at 120: 150 and 200 are an abandoned timeline.
    assert plan_retention([100, 120, 150, 200], [100, 120, 150, 200, 170], keep, just_committed=120, previous=100) == (dropped, [170])
    # The next save of the new timeline keeps 120.
    assert plan_retention([100, 120, 130], [100, 120, 130], 3, just_committed=130, previous=120) == ([], [])


@given(st.sets(st.integers(0, 50)), st.sets(st.integers(0, 50)), st.integers(1, 5), st.integers(0, 50), st.none() | st.integers(0, 50))
def test_retention_never_drops_its_own_save_and_keeps_the_newest_before_it(committed, partial, keep, just, previous):
    drop_committed, drop_partial = plan_retention(sorted(committed), sorted(partial | committed), keep, just, previous)
    kept = (committed | {just}) - set(drop_committed)
    assert just in kept and max(kept) == just
    assert all(previous is None or not previous < s < just for s in kept)
    older = sorted(s for s in committed if s < just and (previous is None or s <= previous))
    assert kept - {just} == set(older[::-1][: keep - 1])
    assert set(drop_partial) == partial - committed - {just}


def test_commit_record_round_trip_and_rejects_bad_records():
    record = CommitRecord(7, 2, (FileEntry("rank_00000.safetensors", "crc32:00000001", 10), FileEntry("rank_00001.safetensors", "crc32:00000002", 12)), 1.0, {"averager": {"step": 7}})
    assert CommitRecord.from_json(record.to_json()) == record
    assert record.total_bytes == 22
    bad = record.to_json() | {"world_size": 3}
    with pytest.raises(ValueError, match="world_size=3"):
        CommitRecord.from_json(bad)
    bad = record.to_json()
    bad["files"][1]["name"] = "rank_00007.safetensors"
    with pytest.raises(ValueError, match="expected"):
        CommitRecord.from_json(bad)
    with pytest.raises(ValueError, match="format"):
        CommitRecord.from_json({"format": 99})
    with pytest.raises(ValueError, match="malformed"):
        CommitRecord.from_json({"format": 2, "step": 1})


def test_a_record_cannot_claim_an_unbounded_world_or_file_size():
    good = CommitRecord(3, 1, (FileEntry("rank_00000.safetensors", "crc32:00000001", 10),), 1.0).to_json()
    for bad, match in [
        (good | {"world_size": 10**12}, "world_size"),
        (good | {"world_size": MAX_WORLD_SIZE}, "list of world_size"),  # files do not back the claim
        (good | {"world_size": "1"}, "world_size"),
        (good | {"files": [{"name": "rank_00000.safetensors", "checksum": "c", "bytes": 1 << 60}]}, "size"),
        (good | {"step": -1}, "-1"),
    ]:
        with pytest.raises(ValueError, match=match):
            CommitRecord.from_json(bad)


def test_a_version_0_1_record_reads_with_its_averager_as_an_entry():
    old = {"format": 1, "step": 4, "world_size": 1, "unix_time": 1.0, "averager": {"step": 4},
           "files": [{"name": "rank_00000.ehsgd", "checksum": "crc32:00000001", "bytes": 10}]}
    record = CommitRecord.from_json(old)
    assert record.file_for_rank(0).name == "rank_00000.ehsgd" and record.entries == {"averager": {"step": 4}}
