"""CheckpointManager in one process, on a local folder, memory:// and a real S3 API server."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import pytest
import torch

from elastic_hsgd import CheckpointManager
from elastic_hsgd.checkpoint import CheckpointError
from elastic_hsgd.checkpoint.layout import COMMIT_NAME, step_dir_name


def _training_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 6)).square().sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer, "epoch": seed}


def _files(url, options):
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def test_round_trip_retention_and_plain_values(checkpoint_url):
    url, options = checkpoint_url
    manager = CheckpointManager(url, keep=2, storage_options=options)
    assert manager.steps() == [] and manager.load_latest(_training_state(9)) is None
    state = _training_state(0)
    for step in (10, 20, 30):
        state["epoch"] = step
        manager.save(step, state)
    assert manager.steps() == [20, 30]
    fs, root = _files(url, options)
    assert not fs.exists(f"{root}/{step_dir_name(10)}")

    restored = _training_state(5)
    torch.manual_seed(123)
    assert manager.load_latest(restored) == 30
    assert restored["epoch"] == 30
    assert torch.equal(restored["model"].weight, state["model"].weight)
    assert restored["optimizer"].state_dict()["state"][0]["step"] == 1
    assert manager.load(20, restored) == 20 and restored["epoch"] == 20
    with pytest.raises(CheckpointError, match="step 10"):
        manager.load(10, restored)


def test_async_save_returns_and_commits(checkpoint_url):
    url, options = checkpoint_url
    with CheckpointManager(url, storage_options=options, async_save=True) as manager:
        state = _training_state(1)
        manager.save(1, state)
        before = state["model"].weight.detach().clone()
        with torch.no_grad():
            state["model"].weight.add_(1.0)  # training goes on while the staged copy is written
        manager.wait()
        assert manager.steps() == [1]
        restored = _training_state(2)
        manager.load_latest(restored)
        assert torch.equal(restored["model"].weight, before)


def test_pending_async_save_is_committed_at_exit(tmp_path):
    script = (
        "import sys, torch\n"
        "from elastic_hsgd import CheckpointManager\n"
        "manager = CheckpointManager(sys.argv[1], async_save=True)\n"
        "manager.save(5, {'weights': torch.arange(1_000_000.0)})\n"
        "print('returned', flush=True)\n"  # then the interpreter exits with the save pending
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "returned", out.stderr
    manager = CheckpointManager(str(tmp_path / "ckpt"))
    state = {"weights": torch.zeros(1)}
    assert manager.load_latest(state) == 5 and torch.equal(state["weights"], torch.arange(1_000_000.0))


def _corrupt(fs, path, how):
    data = fs.cat_file(path)
    if how == "truncated":
        fs.pipe_file(path, data[: len(data) // 2])
    else:
        fs.pipe_file(path, data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_newest_falls_back_with_a_warning(checkpoint_url, how, caplog):
    url, options = checkpoint_url
    manager = CheckpointManager(url, storage_options=options)
    good = _training_state(0)
    manager.save(1, good)
    manager.save(2, _training_state(1))
    fs, root = _files(url, options)
    _corrupt(fs, f"{root}/{step_dir_name(2)}/rank_00000.safetensors", how)
    restored = _training_state(3)
    with caplog.at_level("WARNING"):
        assert manager.load_latest(restored) == 1
    assert "step 2" in caplog.text and how in caplog.text
    assert torch.equal(restored["model"].weight, good["model"].weight)


def test_partial_checkpoint_is_ignored_then_cleaned(checkpoint_url):
    url, options = checkpoint_url
    manager = CheckpointManager(url, storage_options=options)
    manager.save(1, _training_state(0))
    fs, root = _files(url, options)
    partial = f"{root}/{step_dir_name(2)}"
    fs.makedirs(partial, exist_ok=True)
    fs.pipe_file(f"{partial}/rank_00000.safetensors", b"half a file")
    fs.pipe_file(f"{partial}/{COMMIT_NAME}.tmp-abc", b"{")
    assert manager.steps() == [1]
    assert manager.load_latest(_training_state(2)) == 1
    manager.save(3, _training_state(0))
    fs.invalidate_cache()
    assert not fs.exists(partial)
    assert manager.steps() == [1, 3]


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


def test_malicious_pickle_is_refused_without_running(tmp_path, caplog):
    url = str(tmp_path / "ckpt")
    manager = CheckpointManager(url)
    manager.save(1, _training_state(0))
    manager.save(2, _training_state(0))
    marker = tmp_path / "pwned"
    step_dir = tmp_path / "ckpt" / step_dir_name(2)
    torch.save({"model": _RunsCode(str(marker))}, step_dir / "rank_00000.safetensors")
    # The attacker also rewrites the commit record, so checksums match.
    record = json.loads((step_dir / COMMIT_NAME).read_text())
    data = (step_dir / "rank_00000.safetensors").read_bytes()
    record["files"][0].update(checksum=f"crc32:{zlib.crc32(data):08x}", bytes=len(data))
    (step_dir / COMMIT_NAME).write_text(json.dumps(record))
    with caplog.at_level("WARNING"):
        assert manager.load_latest(_training_state(1)) == 1
    assert "refused by the safe loader" in caplog.text
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        manager.load(2, _training_state(1))
    assert not marker.exists()


def test_unusable_url_fails_at_construction(tmp_path, moto_endpoint):
    from tests.conftest import s3_options

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="a-file"):
        CheckpointManager(str(blocker / "ckpt"))
    with pytest.raises(CheckpointError, match="no-such-bucket"):
        CheckpointManager("s3://no-such-bucket-here/run", storage_options=s3_options(moto_endpoint), retries=0)
    with pytest.raises(ValueError, match="keep=0"):
        CheckpointManager(str(tmp_path / "ok"), keep=0)


class FlakyMemoryFileSystem(MemoryFileSystem):
    """Fault injection over the real memory filesystem: the first writes fail."""

    protocol = ("flakymem",)
    failures_left = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flakymem://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode and FlakyMemoryFileSystem.failures_left > 0:
            FlakyMemoryFileSystem.failures_left -= 1
            raise ConnectionError("injected transient failure")
        return super()._open(path, mode, **kwargs)


def test_transient_errors_are_retried_and_final_failure_is_clear(caplog):
    fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)
    manager = CheckpointManager("flakymem://run", retry_backoff_s=0.01, retries=3)
    state = _training_state(0)
    FlakyMemoryFileSystem.failures_left = 2
    with caplog.at_level("WARNING"):
        manager.save(1, state)
    assert "retry 1/3" in caplog.text and manager.steps() == [1]
    FlakyMemoryFileSystem.failures_left = 100
    weight = state["model"].weight.detach().clone()
    with pytest.raises(CheckpointError, match="failed after 4 attempts"):
        manager.save(2, state)
    FlakyMemoryFileSystem.failures_left = 100
    manager.save(3, state, blocking=False)
    with pytest.raises(CheckpointError, match="asynchronous save of step 3"):
        manager.wait()
    FlakyMemoryFileSystem.failures_left = 0
    assert manager.steps() == [1]
    assert torch.equal(state["model"].weight, weight)


def test_cli_ls_and_inspect(tmp_path):
    from elastic_hsgd import HierarchicalModelAverager
    import torch.distributed as dist

    url = str(tmp_path / "ckpt")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        averager = HierarchicalModelAverager({2: "world"}, warmup_steps=4)
        averager.step = 12
        manager = CheckpointManager(url)
        manager.save(12, {**_training_state(0), "averager": averager})
        manager.close()
    finally:
        dist.destroy_process_group()
    ls = subprocess.run([sys.executable, "-m", "elastic_hsgd", "ls", url], capture_output=True, text=True, check=True)
    assert ls.stdout.split("\n")[1].split()[:2] == ["12", "1"]
    out = subprocess.run([sys.executable, "-m", "elastic_hsgd", "inspect", url], capture_output=True, text=True, check=True)
    record = json.loads(out.stdout)
    assert record["entries"]["averager"]["step"] == 12 and record["entries"]["averager"]["levels"] == [[2, 1]]
    missing = subprocess.run([sys.executable, "-m", "elastic_hsgd", "inspect", url, "--step", "5"], capture_output=True, text=True)
    assert missing.returncode == 1 and "step 5 is not committed" in missing.stderr
