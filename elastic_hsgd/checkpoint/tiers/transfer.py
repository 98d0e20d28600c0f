"""Bytes between ranks of the local tier's gloo group: a save's buddy copy, a load plan's cross-node reads.

Point-to-point on the tier's own group, from its save thread or its load; the
caller verifies what arrives against the commit record. Every rank of the
group must call the same function with the same plan, or the sends hang.

Example::

    >>> # xdoctest: +SKIP("needs a process group")
    >>> received = exchange_with_buddy(blob, buddies=[1, 0], rank=0, group=group)
    >>> sorted(received)   # rank 1 keeps its copy with rank 0
    [1]
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..local_plan import LoadPlan, Read


def exchange_with_buddy(blob: bytearray, buddies: list[int | None], rank: int, group: dist.ProcessGroup | None) -> dict[int, bytearray]:
    """Send our bytes to our buddy and receive the bytes of everyone whose buddy we are (sizes first).

    ``buddies[r]`` is the rank that keeps rank r's copy (:func:`~..local_plan.buddy_ranks`).
    Returns sender -> bytes; ``{}`` without a group.
    """
    if group is None:
        return {}
    sends, outgoing = [], []
    buddy = buddies[rank]
    if buddy is not None:
        # The tensors stay referenced until the sends complete.
        outgoing = [torch.tensor([len(blob)], dtype=torch.int64), torch.frombuffer(blob, dtype=torch.uint8)]
        sends = [dist.isend(t, buddy, group=group, tag=tag) for tag, t in enumerate(outgoing)]
    received = {}
    for sender in (s for s, b in enumerate(buddies) if b == rank):
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, sender, group=group, tag=0)
        out = bytearray(int(size.item()))
        dist.recv(torch.frombuffer(out, dtype=torch.uint8), sender, group=group, tag=1)
        received[sender] = out
    for work in sends:
        work.wait()
    del outgoing
    return received


def transfer_reads(
    plan: LoadPlan, rank: int, outgoing: list[tuple[int, Read, bytearray]], group: dist.ProcessGroup | None
) -> list[tuple[Read, bytearray]]:
    """Send what this rank read for others, receive what others read for it.

    ``outgoing`` holds ``(index in plan.reads, read, bytes)`` for each read
    this rank holds for another rank; the index is the message tag. Returns
    each received read with its bytes (as long as the commit record says;
    unverified), in plan order.
    """
    sends = [dist.isend(torch.frombuffer(data, dtype=torch.uint8), read.rank, group=group, tag=index) for index, read, data in outgoing]
    received = []
    for index, read in enumerate(plan.reads):
        if read.rank == rank and read.holder != rank:
            data = bytearray(plan.record.file_for_rank(read.saved_rank).bytes)
            dist.recv(torch.frombuffer(data, dtype=torch.uint8), read.holder, group=group, tag=index)
            received.append((read, data))
    for work in sends:
        work.wait()
    return received
