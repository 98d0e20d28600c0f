"""The few object collectives that let ranks act as one: gather, rank 0 does it, agree on an error.

Every rank of a group must reach each of these calls, also the ranks whose own
work failed: a failure is turned into a value, gathered, and then raised on
every rank at once, never on one rank while the others wait. A torchrun log
holds one copy of the reasons: rank 0 raises them all, the other ranks raise a
short error pointing at rank 0.

Example::

    >>> peers = Peers(None)                      # no process group: a world of one
    >>> peers.gather("ok")
    ['ok']
    >>> combine_errors([None, "disk full", "disk full"], "saving")
    'saving failed on 2 of 3 rank(s): ranks [1, 2]: disk full'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .process_groups import release_group

T = TypeVar("T")


def combine_errors(errors: list[str | None], what: str) -> str | None:
    """One message for every rank's outcome, ``None`` if all succeeded; each
    distinct reason once, with the ranks that hit it."""
    by_reason: dict[str, list[int]] = {}
    for rank, error in enumerate(errors):
        if error:
            by_reason.setdefault(error, []).append(rank)
    if not by_reason:
        return None
    failed = sum(len(ranks) for ranks in by_reason.values())
    parts = [f"{_ranks(ranks)}: {reason}" for reason, ranks in list(by_reason.items())[:4]]
    more = f"; and {len(by_reason) - 4} more reasons" if len(by_reason) > 4 else ""
    return f"{what} failed on {failed} of {len(errors)} rank(s): " + "; ".join(parts) + more


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def describe(exc: BaseException) -> str:
    """An exception as one line for another rank's message: ``"OSError: disk full"``."""
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Peers:
    """The members of one process group, and the object collectives they agree with.

    ``group`` ``None`` is a world of one (no ``torch.distributed``), or a group
    already released: every collective is then local. ``error`` is the
    exception type raised on agreed failures (e.g. ``CheckpointError``).
    """

    group: dist.ProcessGroup | None
    rank: int = 0
    world_size: int = 1
    error: type[Exception] = RuntimeError

    @classmethod
    def own_gloo_group(cls, timeout: timedelta, error: type[Exception] = RuntimeError) -> "Peers":
        """A new gloo group of the whole world (collective), or a world of one without ``torch.distributed``.

        gloo, so the members coordinate on CPU (also from a background thread)
        even when training uses NCCL.
        """
        if dist.is_available() and dist.is_initialized():
            group = dist.new_group(backend="gloo", timeout=timeout)
            return cls(group, dist.get_rank(), dist.get_world_size(), error)
        return cls(None, 0, 1, error)

    def gather(self, obj: Any) -> list[Any]:
        """Every member's ``obj``, in rank order."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the members, in place."""
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def reduce_(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Reduce ``tensor`` over the members in place; ``op`` is ``"sum"``, ``"min"`` or ``"max"``."""
        if self.group is not None:
            ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
            dist.all_reduce(tensor, op=ops[op], group=self.group)
        return tensor

    def on_rank0(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 and shared; its failure raises on every rank at once."""
        value, error = None, None
        if self.rank == 0:
            try:
                value = fn()
            except Exception as exc:  # noqa: BLE001 - every rank must reach the broadcast
                error = describe(exc)
        if self.group is not None:
            box = [(value, error)]
            dist.broadcast_object_list(box, src=0, group=self.group)
            value, error = box[0]
        if error:
            raise self.error(f"{what} failed on rank 0: {error}")
        return value  # type: ignore[return-value]

    def raise_if_any(self, errors: list[str | None], what: str) -> None:
        """Raise the same failure on every rank, given every rank's error (``None``: it succeeded)."""
        if combine_errors(errors, what) is not None:
            raise self.error(self._message(errors, sum(1 for e in errors if e), what))

    def agree(self, error: BaseException | None, what: str, *, soft: type[Exception] | None = None) -> None:
        """Collective: raise on every rank if any rank's ``error`` is set.

        The raised type is ``soft`` when every failure was a ``soft`` one (e.g.
        a checkpoint that does not verify, which a reader falls back past),
        else :attr:`error`. A ``soft`` error's message is kept as it is; any
        other's is prefixed with its type.
        """
        report = None
        if error is not None:
            unusable = soft is not None and isinstance(error, soft)
            report = (unusable, str(error) if unusable else describe(error))
        reports = self.gather(report)
        failed = [r for r in reports if r is not None]
        if not failed:
            return
        message = self._message([None if r is None else r[1] for r in reports], len(failed), what)
        if soft is not None and all(unusable for unusable, _ in failed):
            raise soft(message)
        raise self.error(message)

    def _message(self, errors: list[str | None], failed: int, what: str) -> str:
        # One copy in a torchrun log: rank 0 gives every reason, the others point to it.
        if self.rank != 0:
            return f"{what} failed on {failed} rank(s); rank 0 reports the reasons"
        return combine_errors(errors, what) or ""

    def release(self) -> None:
        """Destroy the group (joining its gloo threads); the collectives are local from then on."""
        release_group(self.group)
        self.group = None
