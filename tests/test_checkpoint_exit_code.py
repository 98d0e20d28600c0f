"""A script that ends with an asynchronous save pending: its exit code says whether that save committed (issue 19.5)."""

from __future__ import annotations

import subprocess
import sys

# Rank files cannot be written (the storage check's probe file can): every save fails.
SCRIPT = """
import sys, torch, fsspec
from fsspec.implementations.local import LocalFileSystem

class NoRankFiles(LocalFileSystem):
    protocol = ("norankfiles",)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "w" in mode and "rank_" in str(path):
            raise PermissionError("injected: the volume refuses rank files")
        return super()._open(path, mode, block_size=block_size, **kwargs)

fsspec.register_implementation("norankfiles", NoRankFiles, clobber=True)
from elastic_hsgd import CheckpointManager

manager = CheckpointManager("norankfiles://" + sys.argv[1], async_save=True)
manager.save(7, {"weights": torch.arange(1000.0)})
print("returned", flush=True)  # then the script ends without close(), as the guide allows
"""


def test_a_failed_pending_save_at_exit_makes_the_process_exit_non_zero(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "returned", out.stderr
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert "step 7" in out.stderr and "not saved" in out.stderr, out.stderr[-2000:]
