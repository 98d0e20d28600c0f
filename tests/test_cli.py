"""The command line: inspect's summary, export of a consolidated model, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elastic_hsgd import CheckpointManager
from elastic_hsgd.__main__ import main as cli
from elastic_hsgd.checkpoint.layout import step_dir_name
from elastic_hsgd.checkpoint.state import deserialize
from tests.distributed import free_port, run_workers

V01 = str(Path(__file__).parent / "data" / "checkpoint_v0.1")


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _error_lines(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if not line.startswith(("usage:", " "))]
    assert lines and all(line.startswith("error:") for line in lines), err
    return lines


# -- export -------------------------------------------------------------------


def _save_differing_replicas(rank: int, world_size: int, url: str) -> dict:
    from elastic_hsgd import HierarchicalModelAverager

    torch.manual_seed(0)
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) + rank)  # the replicas differ, as between averaging points
    model(torch.randn(8, 3))  # BatchNorm's running stats, and num_batches_tracked = 1 on both
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 3)).sum().backward()
    optimizer.step()
    averager = HierarchicalModelAverager({2: "world"})
    manager = CheckpointManager(url, keep=3)
    saved = {k: (v.tolist(), str(v.dtype)) for k, v in model.state_dict().items()}  # plain lists cross the queue
    averager.step = 1
    manager.save(1, {"model": model, "optimizer": optimizer, "averager": averager})
    averager.step = 2
    compiled = torch.compile(model)  # a real wrapper: its state_dict keys start with _orig_mod.
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    manager.save(2, {"model": compiled, "optimizer": optimizer, "averager": averager})
    model[1].num_batches_tracked.fill_(rank)  # an integer buffer that disagrees
    averager.step = 3
    manager.save(3, {"model": model, "optimizer": optimizer, "averager": averager})
    manager.close()
    return saved


def test_export_writes_the_mean_of_replicas_loadable_strictly_into_a_fresh_model(tmp_path, capsys):
    url = str(tmp_path / "ckpt")
    replicas = [
        {k: torch.tensor(values, dtype=getattr(torch, dtype.removeprefix("torch."))) for k, (values, dtype) in r.items()}
        for r in run_workers(_save_differing_replicas, 2, url)
    ]
    mean = {k: torch.stack([r[k] for r in replicas]).double().mean(0).to(v.dtype) if v.is_floating_point() else v for k, v in replicas[0].items()}
    assert not torch.equal(replicas[0]["0.weight"], replicas[1]["0.weight"])

    for step in (1, 2):  # 2 was saved through a torch.compile wrapper
        out = str(tmp_path / f"model{step}.safetensors")
        assert cli(["export", url, "--step", str(step), out]) == 0
        assert f"the mean of 2 saved replicas of step {step} (entry 'model')" in capsys.readouterr().out
        fresh = _model()
        fresh.load_state_dict(load_file(out), strict=True)
        assert all(torch.equal(fresh.state_dict()[k], mean[k]) for k in mean)

    out = str(tmp_path / "rank1.safetensors")
    assert cli(["export", url, "--step", "1", "--rank", "1", out]) == 0
    assert "saved rank 1's replica" in capsys.readouterr().out
    assert load_file(out).keys() == replicas[1].keys()
    assert all(torch.equal(load_file(out)[k], v) for k, v in replicas[1].items())

    out = str(tmp_path / "step3.safetensors")
    assert cli(["export", url, out]) == 1  # the newest step: num_batches_tracked 0 vs 1
    err = _error_lines(capsys.readouterr().err)
    assert "'1.num_batches_tracked' (int64) differs between saved ranks 0 and 1" in err[0] and "--rank R" in err[0]
    assert not (tmp_path / "step3.safetensors").exists() and list(tmp_path.glob(".step3*")) == []
    assert cli(["export", url, "--rank", "0", out]) == 0
    assert load_file(out)["1.num_batches_tracked"].item() == 0

    for args, message in [
        (["--rank", "2"], "rank 2 is not a saved rank of step 3: its ranks are 0..1"),
        (["--step", "7"], "step 7 is not committed"),
        (["--entry", "optimizer"], "entry 'optimizer' is not a module state dict"),
        (["--entry", "ema"], "entry 'ema' does not exist; the checkpoint holds: model (module state, 9 tensors), optimizer"),
    ]:
        assert cli(["export", url, *args, out]) == 1
        assert message in _error_lines(capsys.readouterr().err)[0]


def test_export_asks_which_entry_when_several_hold_a_module_and_reads_only_ranges(tmp_path, capsys, monkeypatch):
    from elastic_hsgd.checkpoint.storage import Storage

    url = str(tmp_path / "ckpt")
    torch.manual_seed(0)
    student, teacher = _model(), _model()
    manager = CheckpointManager(url)
    manager.save(5, {"student": student, "teacher": teacher, "epoch": 2})
    manager.close()

    read_into = Storage.read_into

    def whole_file(self, path, nbytes):
        assert not path.endswith(".safetensors"), "export read a whole rank file"
        return read_into(self, path, nbytes)  # commit records

    monkeypatch.setattr(Storage, "read_into", whole_file)
    out = str(tmp_path / "m.safetensors")
    assert cli(["export", url, out]) == 1
    err = _error_lines(capsys.readouterr().err)[0]
    assert "several entries are module state dicts (student, teacher)" in err and "--entry NAME" in err
    assert cli(["export", url, "--entry", "teacher", out]) == 0
    assert all(torch.equal(load_file(out)[k], v) for k, v in teacher.state_dict().items())


def test_export_reads_version_0_1_checkpoints(tmp_path):
    out = str(tmp_path / "v01.safetensors")
    assert cli(["export", V01, out]) == 0
    saved = deserialize(open(f"{V01}/{step_dir_name(4)}/rank_00000.ehsgd", "rb").read())["model"]
    exported = load_file(out)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], v) for k, v in saved.items())


def test_export_from_s3(s3_bucket, tmp_path):
    url, options = s3_bucket
    torch.manual_seed(0)
    model = _model()
    manager = CheckpointManager(f"{url}/run", storage_options=options)
    manager.save(1, {"model": model})
    manager.close()
    out = str(tmp_path / "s3.safetensors")
    assert cli(["export", f"{url}/run", out, "--storage-options", json.dumps(options)]) == 0
    assert all(torch.equal(load_file(out)[k], v) for k, v in model.state_dict().items())


# -- inspect ----------------------------------------------------------------------


def test_inspect_summarizes_by_default_and_full_prints_the_commit_record(single_process_group, tmp_path, capsys):
    from elastic_hsgd import HierarchicalModelAverager

    url = str(tmp_path / "ckpt")
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    averager = HierarchicalModelAverager({2: "world"}, warmup_steps=4)
    averager.step = 12
    manager = CheckpointManager(url)
    manager.save(12, {"model": model, "optimizer": optimizer, "averager": averager, "epoch": 3})
    manager.close()

    assert cli(["inspect", url]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out)
    tensors = model.state_dict().values()
    assert summary["entries"]["model"] == {"tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors)}
    assert summary["entries"]["optimizer"]["tensors"] == 3 * len(list(model.parameters()))  # step, exp_avg, exp_avg_sq
    averager_summary = summary["entries"]["averager"]
    assert averager_summary["step"] == 12 and averager_summary["levels"] == [[2, 1]] and averager_summary["config"] == [[2, "world"]]
    assert summary["entries"]["epoch"] == {"value": 3}
    assert (summary["step"], summary["world_size"], summary["dir"]) == (12, 1, step_dir_name(12))

    assert cli(["inspect", url, "--full"]) == 0
    full = capsys.readouterr().out
    record = json.loads(full)
    assert record["entries"]["model"]["0.weight"] == "tensor(float32, [4, 3])" and record["files"][0]["name"].startswith("rank_00000")
    assert len(out.splitlines()) < len(full.splitlines())


# -- errors ---------------------------------------------------------------------


def test_every_error_is_one_line_beginning_with_error_and_exits_nonzero(tmp_path, capsys):
    url = str(tmp_path / "ckpt")
    manager = CheckpointManager(url)
    manager.save(8, {"model": _model()})
    manager.close()

    assert cli(["ls", f"{url}/{step_dir_name(8)}"]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"is the folder of one step ({step_dir_name(8)}); pass the run's folder, its parent: {url}" in line

    assert cli(["inspect", url, "--storage-options", "{bad json"]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith("error: --storage-options is not valid JSON") and "'{bad json'" in line
    assert cli(["ls", url, "--storage-options", '["a"]']) == 1
    assert "--storage-options must be a JSON object" in _error_lines(capsys.readouterr().err)[0]

    for argv in (["inspect", url, "--step", "3"], ["verify", url, "--step", "3"], ["ls", str(tmp_path / "nothing")],
                 ["inspect", str(tmp_path / "nothing")], ["export", str(tmp_path / "nothing"), str(tmp_path / "o.safetensors")]):
        assert cli(argv) == 1
        assert len(_error_lines(capsys.readouterr().err)) == 1

    with pytest.raises(SystemExit) as exit_info:
        cli(["inspect", url, "--step", "x"])
    assert exit_info.value.code == 2
    assert _error_lines(capsys.readouterr().err) == ["error: python -m elastic_hsgd inspect: argument --step: invalid int value: 'x'"]


def test_an_unreachable_endpoint_is_one_line_not_a_traceback(tmp_path, capsys):
    options = {
        "key": "testing", "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},  # nothing listens there
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    for command in ("ls", "inspect", "export"):
        argv = [command, "s3://no-bucket/run", "--storage-options", json.dumps(options)]
        assert cli(argv + ([str(tmp_path / "out.safetensors")] if command == "export" else [])) == 1
        captured = capsys.readouterr()
        (line,) = _error_lines(captured.err)
        assert "s3://no-bucket/run is not reachable: Could not connect to the endpoint URL" in line
        assert "Traceback" not in captured.err + captured.out
