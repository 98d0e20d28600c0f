from __future__ import annotations

import pytest


@pytest.fixture
def single_process_group():
    """A real gloo process group of world size 1 in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
