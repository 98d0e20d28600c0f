"""torchft's DiLoCo as a peer to compare against: real lighthouse, real Managers.

Each process is its own torchft replica group of one (``ProcessGroupGloo``),
joined through a lighthouse; :func:`torchft_diloco` wraps a model and its inner
optimizer in ``torchft.local_sgd.DiLoCo`` (non-streaming: one fragment, no
quantization) with an outer Nesterov SGD, counting the bytes torchft all-reduces.

Healing is never exercised: replicas start in step, ``init_sync=False``, and the
checkpoint transport refuses to send or receive (torchft's default HTTP
transport unpickles what it receives; nothing here loads a peer's bytes).

Example::

    >>> # xdoctest: +SKIP("needs torchft and two processes")
    >>> lighthouse = start_lighthouse(min_replicas=2)          # in the parent
    >>> # in each of the two workers:
    >>> with torchft_diloco(lighthouse.address(), f"replica_{rank}", model, inner, sync_every=16) as peer:
    ...     for batch in data:
    ...         inner.zero_grad(); loss(model(batch)).backward(); inner.step()  # syncs every 16 steps
    >>> peer.allreduce_bytes, peer.manager_steps
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch


def start_lighthouse(min_replicas: int, join_timeout_ms: int = 10_000) -> Any:
    """torchft's lighthouse server in this process (the same server as ``torchft_lighthouse``)."""
    from torchft._torchft import LighthouseServer

    return LighthouseServer(bind="[::]:0", min_replicas=min_replicas, join_timeout_ms=join_timeout_ms)


def _transport_class() -> type:
    from torchft.checkpointing import CheckpointTransport

    class NoHealTransport(CheckpointTransport):
        """Refuses to move checkpoints: a heal here would be a bug in the comparison."""

        def metadata(self) -> str:
            return "no-heal"

        def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
            raise RuntimeError(f"torchft asked to heal replicas {dst_ranks} at step {step}; the peer never heals")

        def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
            raise RuntimeError(f"torchft asked to heal from replica {src_rank} at step {step}; the peer never heals")

    return NoHealTransport


@dataclass
class Peer:
    """What a running torchft DiLoCo peer exposes."""

    manager: Any
    diloco: Any
    allreduce_bytes: int = 0

    @property
    def manager_steps(self) -> int:
        """Outer steps torchft committed."""
        return int(self.manager.current_step())


@contextlib.contextmanager
def torchft_diloco(
    lighthouse_addr: str,
    replica_id: str,
    model: torch.nn.Module,
    inner_optimizer: torch.optim.Optimizer,
    sync_every: int,
    *,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    min_replicas: int = 2,
    timeout: timedelta = timedelta(seconds=60),
) -> Iterator[Peer]:
    """A torchft Manager for a replica group of this one process, and DiLoCo on ``model``."""
    import torch.distributed as dist
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    # The replica group's own store; torchft's Manager joins it as a client.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=min_replicas,
        use_async_quorum=False,  # DiLoCo requires it
        replica_id=replica_id,
        store_addr="127.0.0.1",
        store_port=port,
        rank=0,
        world_size=1,
        lighthouse_addr=lighthouse_addr,
        timeout=timeout,
        quorum_timeout=timeout,
        init_sync=False,
        checkpoint_transport=_transport_class()(),
    )
    outer = torch.optim.SGD(model.parameters(), lr=outer_lr, momentum=outer_momentum, nesterov=True)
    peer = Peer(manager, None)
    original = manager.allreduce

    def counting_allreduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        peer.allreduce_bytes += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    manager.allreduce = counting_allreduce
    try:
        with DiLoCo(manager, [model], inner_optimizer, outer, sync_every=sync_every, pin_memory=False) as diloco:
            peer.diloco = diloco
            yield peer
    finally:
        manager.shutdown(wait=False)
        del store
