"""Issue 14: no silent surprises for a user's own training script.

Entries a load would drop, a save without the averager, hook/averager drift,
the CLI on missing locations and `verify`, one message per collective failure.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from elastic_hsgd import CheckpointManager, HierarchicalModelAverager
from elastic_hsgd.__main__ import main as cli
from elastic_hsgd.checkpoint import CheckpointError
from elastic_hsgd.checkpoint.layout import COMMIT_NAME, rank_file_name, step_dir_name

RANK0 = rank_file_name(0)
from elastic_hsgd.checkpoint.manager import combine_errors
from elastic_hsgd.checkpoint.storage import checksum_of
from elastic_hsgd.elastic import attach_post_local_sgd
from tests.distributed import run_workers


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer, "epoch": seed}


# -- 1. entries a load would drop; a save without the averager ---------------


def test_load_names_checkpoint_entries_that_state_lacks_unless_strict_false(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(3, _state(1))
    partial = _state(2)
    del partial["epoch"]
    before = partial["model"].weight.detach().clone()
    for load in (lambda s, **kw: manager.load_latest(s, **kw), lambda s, **kw: manager.load(3, s, **kw)):
        with pytest.raises(KeyError, match=r"\['epoch'\].*strict=False"):
            load(partial)
        assert torch.equal(partial["model"].weight, before)  # refused before loading anything
    assert manager.load_latest(partial, strict=False) == 3
    assert not torch.equal(partial["model"].weight, before)
    manager.close()


def test_save_without_the_averager_warns_once(single_process_group, tmp_path):
    averager = HierarchicalModelAverager({2: "world"})
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    with pytest.warns(UserWarning, match="without the averager.*state\\['averager'\\]"):
        manager.save(1, _state())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager.save(2, _state())  # once per manager
        manager.save(3, {**_state(), "averager": averager})
    manager.close()


# -- issue 9: hook counter and averager step must not drift ------------------


def _ddp_with_hook(warmup: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    averager = HierarchicalModelAverager({2: "world"}, warmup_steps=warmup)
    return ddp, optimizer, averager, attach_post_local_sgd(ddp, averager)


def test_gradient_accumulation_outside_no_sync_is_caught_at_save_and_load(single_process_group):
    ddp, optimizer, averager, counter = _ddp_with_hook(warmup=6)
    for _ in range(2):
        optimizer.zero_grad()
        for _ in range(2):  # two micro-batches, both through the hook
            ddp(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        averager.average_parameters(ddp.parameters())
    with pytest.raises(ValueError, match=r"counted 4 backward passes.*optimizer step 2.*no_sync"):
        counter.state_dict()

    ddp, optimizer, averager, counter = _ddp_with_hook(warmup=6)
    for _ in range(2):
        optimizer.zero_grad()
        with ddp.no_sync():
            ddp(torch.ones(2, 4)).sum().backward()
        ddp(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        averager.average_parameters(ddp.parameters())
    saved = counter.state_dict()  # accumulation inside no_sync: they agree
    assert saved == {"iter": 2, "start_localSGD_iter": 6, "averager_step": 2}
    with pytest.raises(ValueError, match="loading the post-local-SGD counter.*counted 5"):
        counter.load_state_dict({**saved, "iter": 5})


# -- 4. the CLI ----------------------------------------------------------------


def _committed(tmp_path) -> tuple[str, str]:
    url = str(tmp_path / "ckpt")
    manager = CheckpointManager(url)
    manager.save(4, _state(0))
    manager.save(8, _state(1))
    manager.close()
    return url, f"{url}/{step_dir_name(8)}/{RANK0}"


def _rewrite_commit(url: str, step: int, data: bytes) -> None:
    path = f"{url}/{step_dir_name(step)}/{COMMIT_NAME}"
    record = json.loads(open(path).read())
    record["files"][0].update(bytes=len(data), checksum=checksum_of(data))
    open(path, "w").write(json.dumps(record))


def test_cli_on_a_missing_location_exits_nonzero_saying_so(tmp_path, capsys):
    for command in ("ls", "verify", "inspect"):
        assert cli([command, str(tmp_path / "no-such-run")]) == 1
        assert "does not exist" in capsys.readouterr().err


def test_cli_verify_checks_every_file_against_its_commit_record(tmp_path, capsys):
    url, rank_file = _committed(tmp_path)
    assert cli(["verify", url]) == 0
    out = capsys.readouterr().out
    assert "step 4: ok" in out and "step 8: ok" in out
    assert cli(["ls", url, "--verify"]) == 0 and capsys.readouterr().out.count("  ok") == 2

    good = open(rank_file, "rb").read()
    open(rank_file, "wb").write(good[:-10])  # truncated
    assert cli(["verify", url, "--step", "8"]) == 1
    assert f"step 8: {RANK0}: {len(good) - 10} bytes, commit record says {len(good)}" in capsys.readouterr().err
    assert cli(["verify", url, "--step", "4"]) == 0  # only the step asked for
    capsys.readouterr()

    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # same size, different bytes
    open(rank_file, "wb").write(bytes(flipped))
    assert cli(["verify", url]) == 1
    err = capsys.readouterr().err
    assert f"step 8: {RANK0}: checksum" in err and "step 4" not in err

    garbage = b"\x80\x04not a checkpoint" * 8  # recorded size and checksum match, content does not decode
    open(rank_file, "wb").write(garbage)
    _rewrite_commit(url, 8, garbage)
    assert cli(["verify", url]) == 1
    assert f"{RANK0}: refused by the safe decoder" in capsys.readouterr().err
    assert cli(["ls", url, "--verify"]) == 1
    captured = capsys.readouterr()
    assert f"FAILED: {RANK0}: refused" in captured.out and "1 committed step(s)" in captured.err

    import os

    os.remove(rank_file)
    assert cli(["verify", url, "--step", "8"]) == 1 and f"{RANK0}: missing" in capsys.readouterr().err
    assert cli(["verify", url, "--step", "5"]) == 1 and "step 5 is not committed" in capsys.readouterr().err


# -- 5. one message per failure --------------------------------------------------


def test_combined_error_names_each_reason_once_with_its_ranks():
    assert combine_errors([None, None], "saving") is None
    message = combine_errors(["disk full", None, "disk full", "timeout"], "saving")
    assert message == "saving failed on 3 of 4 rank(s): ranks [0, 2]: disk full; rank 3: timeout"


def _unwritable_worker(rank: int, world_size: int, url: str) -> str:
    try:
        CheckpointManager(url)
    except CheckpointError as exc:
        return str(exc)
    return "no error"


def test_unwritable_location_is_reported_once_and_says_not_writable():
    messages = run_workers(_unwritable_worker, 2, "/proc/elastic-hsgd-test/ckpt")
    assert "not writable" in messages[0] and "ranks [0, 1]" in messages[0] and "FileNotFoundError" not in messages[0]
    assert messages[0].count("not writable") == 1  # the same reason of both ranks, once
    assert messages[1] == "checkpoint storage check failed on 2 rank(s); rank 0 reports the reasons"


# -- 3. two levels that resolve to the same group ---------------------------------


def test_levels_resolving_to_the_same_group_are_found_and_logged(single_process_group, caplog):
    from elastic_hsgd.hierarchy import Level, repeated_group_sizes, resolve_levels

    one_node = resolve_levels(((2, "local"), (8, "world")), world_size=4, local_world_size=4)
    assert repeated_group_sizes(one_node) == [(Level(2, 4), Level(8, 4))]
    assert repeated_group_sizes(resolve_levels(((2, "local"), (8, "world")), world_size=4, local_world_size=2)) == []
    with caplog.at_level("WARNING", logger="elastic_hsgd.averager"):
        HierarchicalModelAverager({2: "local", 8: "world"}, local_world_size=1)
    assert "levels local (period 2) and world (period 8) both resolve to groups of 1" in caplog.text
