"""Checkpoint layout logic, without storage or processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_hsgd.checkpoint.layout import CommitRecord, FileEntry, parse_step_dir, plan_retention, source_rank, step_dir_name


def test_step_dir_names_sort_by_step_and_parse_back():
    names = [step_dir_name(s) for s in (9, 10, 100)]
    assert names == sorted(names)
    assert [parse_step_dir(n) for n in names] == [9, 10, 100]
    assert parse_step_dir("s3://b/run/step_000000000042/") == 42
    assert parse_step_dir("step_42") is None and parse_step_dir(".probe-x") is None
    with pytest.raises(ValueError, match="-1"):
        step_dir_name(-1)


def test_source_rank_is_own_rank_at_same_world_and_wraps_otherwise():
    assert [source_rank(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [source_rank(r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert [source_rank(r, 4) for r in range(2)] == [0, 1]


@given(st.sets(st.integers(0, 50)), st.sets(st.integers(0, 50)), st.integers(1, 5), st.integers(0, 50))
def test_retention_keeps_newest_and_never_touches_newer_partials(committed, partial, keep, just):
    committed = committed | {just}
    drop_committed, drop_partial = plan_retention(sorted(committed), sorted(partial | committed), keep, just)
    kept = committed - set(drop_committed)
    assert kept == set(sorted(committed)[-keep:])
    assert just in kept or len([s for s in committed if s > just]) >= keep
    assert all(s < just and s not in committed for s in drop_partial)
    assert set(drop_partial) == {s for s in partial if s < just and s not in committed}


def test_commit_record_round_trip_and_rejects_bad_records():
    record = CommitRecord(7, 2, (FileEntry("rank_00000.ehsgd", "crc32:00000001", 10), FileEntry("rank_00001.ehsgd", "crc32:00000002", 12)), 1.0, {"step": 7})
    assert CommitRecord.from_json(record.to_json()) == record
    assert record.total_bytes == 22
    bad = record.to_json() | {"world_size": 3}
    with pytest.raises(ValueError, match="expected"):
        CommitRecord.from_json(bad)
    with pytest.raises(ValueError, match="format"):
        CommitRecord.from_json({"format": 99})
    with pytest.raises(ValueError, match="malformed"):
        CommitRecord.from_json({"format": 1, "step": 1})
