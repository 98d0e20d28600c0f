"""An elastic data position: per-rank batches cut from one global order that survives world-size changes.

Every epoch is one seeded permutation of the dataset (``seed + epoch``; the
identity with ``shuffle=False``), the same on every rank and at every world
size. The world walks through it one *global batch* at a time:
``batch_size * world_size`` samples, of which rank ``r`` takes the ``r``-th
contiguous ``batch_size``. The state is the epoch and the global position
(samples of this epoch handed out so far), equal on every rank, so a job
resumed at another world size continues from the same place: across
4 -> 2 -> 4 ranks every sample is seen exactly once per epoch.

**The tail of an epoch.** When fewer than ``batch_size * world_size`` samples
are left, they are split as evenly as possible (per-rank sizes differ by at
most one), so every rank runs the same number of steps. When fewer samples
than ranks are left, they are dropped: no rank can take an empty batch. With
``drop_last=True`` any partial global batch is dropped. The epoch then rolls
over: after the last batch is handed out the state is ``(epoch + 1, 0)``.

**Prefetching.** The position counts a batch when it reaches the training
loop. ``DataLoader(dataset, batch_sampler=sampler)`` with ``num_workers=0``
takes one batch from the sampler per loop step, so the sampler's own count is
exact. With ``num_workers > 0`` the loader pulls up to
``prefetch_factor * num_workers`` batches ahead of the loop; iterate
``sampler.track(loader)`` instead of ``loader``: the position then counts the
batches the loader handed to the loop, and a new iteration starts after them,
so what was prefetched but not trained on is neither lost nor repeated.

Example::

    >>> sampler = ElasticSampler(10, batch_size=2, rank=0, world_size=2)
    >>> [len(batch) for batch in sampler]  # two global batches of 4, then a tail of 2 split 1/1
    [2, 2, 1]
    >>> sampler.state_dict()
    {'epoch': 1, 'position': 0}
    >>> first = ElasticSampler(12, batch_size=2, rank=1, world_size=3)
    >>> batch = next(iter(first)); first.state_dict()  # one global batch of 6 handed out
    {'epoch': 0, 'position': 6}
    >>> resumed = ElasticSampler(12, batch_size=2, rank=0, world_size=2)
    >>> resumed.load_state_dict(first.state_dict()); len(resumed)  # 6 left, in global batches of 4
    2
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

T = TypeVar("T")


# -- pure logic -----------------------------------------------------------------


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation seeded by ``seed + epoch``, or the identity."""
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator)


@dataclass(frozen=True)
class GlobalBatches:
    """How one epoch of ``num_samples`` is cut into global batches for ``world_size`` ranks.

    Positions are offsets into the epoch's order. Nothing here depends on the
    rank's history: any world size can start from any position.

    >>> plan = GlobalBatches(num_samples=10, batch_size=2, world_size=2)
    >>> plan.take(0), plan.take(8), [plan.rank_span(8, r) for r in range(2)]
    (4, 2, [(8, 9), (9, 10)])
    >>> plan.batches_left(0), plan.after(0, 8)
    (3, (1, 0))
    """

    num_samples: int
    batch_size: int
    world_size: int
    drop_last: bool = False

    def take(self, position: int) -> int:
        """Samples the global batch at ``position`` takes: a full global batch, the tail, or 0 (epoch over)."""
        left = self.num_samples - position
        full = self.batch_size * self.world_size
        if left >= full:
            return full
        if self.drop_last or left < self.world_size:
            return 0
        return left

    def rank_span(self, position: int, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of the epoch's order that ``rank`` takes from the global batch at ``position``."""
        base, extra = divmod(self.take(position), self.world_size)
        start = position + rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def batches_left(self, position: int) -> int:
        """Batches each rank still gets in this epoch from ``position``."""
        full = self.batch_size * self.world_size
        count = (self.num_samples - position) // full
        return count + (self.take(position + count * full) > 0)

    def after(self, epoch: int, position: int) -> tuple[int, int]:
        """The state once the global batch at ``position`` is handed out (the next epoch when none is left)."""
        return self.normalized(epoch, position + self.take(position))

    def normalized(self, epoch: int, position: int) -> tuple[int, int]:
        """``(epoch, position)``, or ``(epoch + 1, 0)`` when no batch is left at ``position``."""
        return (epoch, position) if self.take(position) > 0 else (epoch + 1, 0)


# -- the sampler ------------------------------------------------------------------


def _count(name: str, value: Any, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"ElasticSampler: {name}={value!r} must be an int >= {minimum}.") from None
    if number < minimum:
        raise ValueError(f"ElasticSampler: {name}={value!r} must be an int >= {minimum}.")
    return number


def _default_world(rank: int | None, world_size: int | None) -> tuple[Any, Any]:
    """``rank`` and ``world_size``, each taken from torch.distributed (or RANK/WORLD_SIZE) when not given."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        found = dist.get_rank(), dist.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        found = []
        for name in ("RANK", "WORLD_SIZE"):
            try:
                found.append(int(os.environ[name]))
            except ValueError:
                raise ValueError(f"ElasticSampler: environment variable {name}={os.environ[name]!r} is not an int.") from None
    else:
        raise ValueError(
            "ElasticSampler: rank and world_size were not given, torch.distributed is not initialized and "
            "RANK/WORLD_SIZE are not set: build the sampler after init_process_group, or pass "
            "rank=0, world_size=1 in a single process."
        )
    return (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)


class ElasticSampler(Sampler[list[int]]):
    """Per-rank batches (lists of indices) of one global order; its state resumes at any world size.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``, and checkpoint it
    as a state entry (``{"data": sampler}``): :meth:`state_dict` is
    ``{"epoch", "position"}``, equal on every rank. See the module docstring
    for the tail of an epoch and for prefetching loaders (:meth:`track`).

    Args:
        num_samples: the dataset's length.
        batch_size: samples per rank per batch (the global batch is ``batch_size * world_size``).
        seed: the permutation of epoch ``e`` is seeded with ``seed + e``; the same on every rank.
        shuffle: ``False``: every epoch is ``0, 1, ..., num_samples - 1``.
        drop_last: drop a partial last global batch instead of splitting it.
        rank, world_size: this rank's place; by default from ``torch.distributed`` when it is
            initialized, else from the ``RANK``/``WORLD_SIZE`` environment. (In torchft
            replica-group mode pass the data-parallel rank and size across groups.)

    A resumed loop starts its epoch loop at :attr:`epoch`::

        >>> # xdoctest: +SKIP("needs a checkpoint")
        >>> state = {"model": model, "optimizer": optimizer, "averager": averager, "data": sampler}
        >>> manager.load_latest(state)
        >>> for epoch in range(sampler.epoch, epochs):
        ...     sampler.set_epoch(epoch)          # keeps a loaded mid-epoch position
        ...     for x, y in sampler.track(loader):
        ...         train_step(x, y)
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_samples = _count("num_samples", num_samples, 1)
        self.batch_size = _count("batch_size", batch_size, 1)
        self.seed = _count("seed", seed, 0)
        self.shuffle = bool(shuffle)
        rank, world_size = _default_world(rank, world_size)
        self.world_size = _count("world_size", world_size, 1)
        self.rank = _count("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"ElasticSampler: rank={rank!r} is not in [0, world_size={self.world_size}).")
        self.plan = GlobalBatches(self.num_samples, self.batch_size, self.world_size, bool(drop_last))
        if self.plan.take(0) == 0:
            need = self.batch_size * self.world_size if drop_last else self.world_size
            raise ValueError(
                f"ElasticSampler: num_samples={self.num_samples} gives no batch to each of world_size={self.world_size} "
                f"ranks (an epoch needs at least {need} samples{' with drop_last=True' if drop_last else ''})."
            )
        self._epoch, self._position = 0, 0
        self._tracked = False

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Samples of this epoch handed out to the whole world so far."""
        return self._position

    def __len__(self) -> int:
        """Batches this rank still gets in this epoch."""
        return self.plan.batches_left(self._position)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position = self._epoch, self._position
        order = epoch_order(self.num_samples, epoch, self.seed, self.shuffle)
        while self.plan.take(position) > 0:
            start, stop = self.plan.rank_span(position, self.rank)
            position += self.plan.take(position)
            if not self._tracked:
                self._advance()  # handed to the loop now: counted now
            yield order[start:stop].tolist()

    def _advance(self) -> None:
        self._epoch, self._position = self.plan.after(self._epoch, self._position)

    def track(self, loader: Iterable[T]) -> Iterator[T]:
        """Iterate ``loader`` (a ``DataLoader`` with ``batch_sampler=self``), counting the batches it hands to the loop.

        Needed when ``num_workers > 0``: the loader then takes batches from this
        sampler ahead of the loop, and only those the loop received are counted.
        Correct with ``num_workers=0`` too. Batches must arrive in order (the
        ``DataLoader`` default, ``in_order=True``).
        """
        if getattr(loader, "batch_sampler", None) is not self:
            raise ValueError(
                f"ElasticSampler.track({type(loader).__name__}): the loader does not draw from this sampler; "
                "build it as DataLoader(dataset, batch_sampler=sampler)."
            )
        if getattr(loader, "in_order", True) is False:
            raise ValueError("ElasticSampler.track: the DataLoader has in_order=False, so batches would be counted out of order.")
        return self._track(loader)

    def _track(self, loader: Iterable[T]) -> Iterator[T]:
        self._tracked = True
        try:
            for batch in loader:
                self._advance()
                yield batch
        finally:
            self._tracked = False

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, as ``DistributedSampler.set_epoch``; the current epoch keeps its position."""
        epoch = _count("epoch", epoch, 0)
        if epoch == self._epoch:
            return
        if epoch < self._epoch:
            logger.warning(
                "ElasticSampler.set_epoch(%d) goes back from epoch %d (position %d): its samples will be seen again. "
                "After load_state_dict, start the epoch loop at sampler.epoch.",
                epoch, self._epoch, self._position,
            )
        self._epoch, self._position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved ``{"epoch", "position"}``, saved at any world size."""
        if not isinstance(state, Mapping) or set(state) != {"epoch", "position"}:
            shown = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"ElasticSampler.load_state_dict: expected keys ['epoch', 'position'], got {shown}.")
        epoch = _count("epoch", state["epoch"], 0)
        position = _count("position", state["position"], 0)
        if position > self.num_samples:
            raise ValueError(
                f"ElasticSampler.load_state_dict: position={position} is past the end of an epoch of "
                f"num_samples={self.num_samples}: the state was saved for another dataset."
            )
        self._epoch, self._position = self.plan.normalized(epoch, position)
        logger.info(
            "data position: epoch %d, sample %d of %d (rank %d of %d)",
            self._epoch, self._position, self.num_samples, self.rank, self.world_size,
        )
