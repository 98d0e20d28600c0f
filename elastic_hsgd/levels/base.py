"""What every kind of level shares: the view of its averager it reads at each call, and
the one error for parameters that cannot live in flat buffers."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Owner(Protocol):
    """What a level reads from its averager at each call.

    Levels hold a weak proxy to the averager (no reference cycle keeps it
    alive) and read these when they run, not when they are built: setting
    ``HierarchicalModelAverager.CPU_CHUNK_ELEMENTS`` applies to averagers
    already built, and a heal inside a top-level sync loads a peer's ``step``,
    which the rest of that sync must see.
    """

    step: int
    warmup_steps: int
    top_level: Any
    CPU_CHUNK_ELEMENTS: int
    CPU_WIRE_CHUNK_ELEMENTS: int


def flat_buffers_needed(by_copy: list[torch.Tensor]) -> ValueError:
    """The error for anchored levels given parameters that cannot be views of a flat buffer.

    Example::

        >>> import torch
        >>> sparse = torch.eye(2).to_sparse()
        >>> str(flat_buffers_needed([sparse])).split(";")[0]
        'outer_optimizers/comm_dtypes need parameters that can live in flat buffers (dense, contiguous)'
    """
    return ValueError(
        f"outer_optimizers/comm_dtypes need parameters that can live in flat buffers (dense, "
        f"contiguous); got {len(by_copy)} sparse or non-contiguous parameter(s) (shapes "
        f"{[list(p.shape) for p in by_copy[:4]]}): make them contiguous, or configure this "
        "hierarchy without outer optimizers and comm dtypes."
    )
