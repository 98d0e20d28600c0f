"""Glue for torchrun workers: process group from the torchelastic environment,
the post-local-SGD hook tied to the averager, a job-wide generation, resume.

Every membership change under torchelastic restarts all workers, so "elastic"
here means: each start builds everything for the current world, validates the
hierarchy before the first averaging step, and resumes from the newest
checkpoint.

**Per-rank RNG.** Ranks seed torch identically so that every rank builds the
same model; afterwards their random streams (dropout, augmentation) must
differ. A same-world resume restores each rank's saved RNG state; on a fresh
start, or when the world size changed (the saved states belong to other
ranks), :func:`resume` reseeds each rank with :func:`rank_seed`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook

from .averager import HierarchicalModelAverager
from .checkpoint import CheckpointManager
from .checkpoint.storage import Storage

logger = logging.getLogger(__name__)

GENERATION_FILE = "GENERATION.json"  # the newest generation, for people and tools
GENERATIONS_DIR = "GENERATIONS"  # the claims: one exclusively created file per generation


@dataclass(frozen=True)
class WorkerInfo:
    """Who this worker is, as torchelastic set it up; returned by :func:`init_distributed`.

    Attributes:
        rank, world_size: this process in the default process group.
        local_rank, local_world_size: ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``, the
            processes torchrun started on this node (``"local"`` in a hierarchy).
        node_rank: ``GROUP_RANK``, the index of this node's agent in the rendezvous.
        restart_count: ``TORCHELASTIC_RESTART_COUNT``; differs between nodes, so use
            :func:`next_generation` for a job-wide counter.
        run_id: ``TORCHELASTIC_RUN_ID`` (``"none"`` outside torchrun).
        backend: the process group's backend, ``"nccl"`` or ``"gloo"``.
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    restart_count: int
    run_id: str
    backend: str


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(backend: str | None = None, timeout: timedelta = timedelta(seconds=60)) -> WorkerInfo:
    """Initialise the default process group from torchrun's environment.

    The explicit ``timeout`` matters: a collective with a lost peer fails
    after it (gloo's default is 30 minutes), which is what lets torchelastic
    notice the loss and re-form the world.

    ``backend`` defaults to ``"nccl"`` when CUDA is available (then the current
    device is set to ``LOCAL_RANK``), else ``"gloo"``. If the default process
    group already exists it is kept. Logs this worker's place at INFO.

    Example::

        >>> # xdoctest: +SKIP("needs torchrun")
        >>> from datetime import timedelta
        >>> info = init_distributed(timeout=timedelta(seconds=30))
        >>> info.rank, info.world_size, info.local_world_size
        (0, 4, 4)
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    info = WorkerInfo(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
        node_rank=_env_int("GROUP_RANK", 0),
        restart_count=_env_int("TORCHELASTIC_RESTART_COUNT", 0),
        run_id=os.environ.get("TORCHELASTIC_RUN_ID", "none"),
        backend=backend,
    )
    logger.info(
        "worker rank %d/%d (local %d/%d, node %d, restart %d, run %s, %s)",
        info.rank, info.world_size, info.local_rank, info.local_world_size,
        info.node_rank, info.restart_count, info.run_id, backend,
    )
    return info


class PostLocalSGDCounter:
    """torch's post-local-SGD hook state, tied to an averager and checkpointable.

    ``start_localSGD_iter`` is the averager's ``warmup_steps`` by construction,
    and :meth:`state_dict` carries the hook's iteration counter, so a resumed
    job neither repeats warmup nor skips it.

    The hook counts backward passes (up to ``start_localSGD_iter``), the
    averager counts optimizer steps: they agree only with one backward pass per
    optimizer step. :meth:`state_dict` and :meth:`load_state_dict` check that
    they do, so gradient accumulation outside ``ddp.no_sync()`` (which would end
    the hook's warmup early) is an error at the first save, not a silent drift.

    Made by :func:`attach_post_local_sgd`; put it in the checkpointed state::

        >>> # xdoctest: +SKIP("needs a process group")
        >>> hook = attach_post_local_sgd(ddp, averager)
        >>> state = {"model": model, "optimizer": optimizer, "averager": averager, "post_local_sgd": hook}
    """

    def __init__(self, hook_state: PostLocalSGDState, averager: HierarchicalModelAverager) -> None:
        self.hook_state = hook_state
        self.averager = averager

    def _expected_iter(self, averager_step: int) -> int:
        return min(averager_step, self.hook_state.start_localSGD_iter)

    def _check(self, hook_iter: int, averager_step: int, when: str) -> None:
        expected = self._expected_iter(averager_step)
        if hook_iter != expected:
            raise ValueError(
                f"{when}: the post-local-SGD hook counted {hook_iter} backward passes but the averager is at "
                f"optimizer step {averager_step} (warmup {self.hook_state.start_localSGD_iter}), so the hook "
                f"expected {expected}. The hook counts backward passes and the averager counts "
                "average_parameters() calls: accumulate gradients inside `with ddp.no_sync():` for all but the "
                "last micro-batch, and call average_parameters() once per optimizer step."
            )

    def state_dict(self) -> dict[str, Any]:
        """The hook's iteration counter, its warmup and the averager's step, as plain ints.

        Raises ``ValueError`` if the hook's count of backward passes does not
        match the averager's count of optimizer steps.
        """
        self._check(self.hook_state.iter, self.averager.step, "saving the post-local-SGD counter")
        return {
            "iter": self.hook_state.iter,
            "start_localSGD_iter": self.hook_state.start_localSGD_iter,
            "averager_step": self.averager.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the hook's iteration counter from :meth:`state_dict`'s output.

        Raises ``ValueError`` if the saved warmup differs from this run's, or if
        the saved counter and averager step disagree.
        """
        if int(state["start_localSGD_iter"]) != self.hook_state.start_localSGD_iter:
            raise ValueError(
                f"checkpoint's post-local-SGD hook started local SGD at iteration "
                f"{state['start_localSGD_iter']}, this run at {self.hook_state.start_localSGD_iter}: "
                "use the saved --warmup-steps."
            )
        if "averager_step" in state:
            self._check(int(state["iter"]), int(state["averager_step"]), "loading the post-local-SGD counter")
        self.hook_state.iter = int(state["iter"])


def attach_post_local_sgd(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    averager: HierarchicalModelAverager,
    subgroup: dist.ProcessGroup | None = None,
) -> PostLocalSGDCounter:
    """Register torch's post-local-SGD hook on ``ddp_model`` for ``averager``.

    During warmup the hook all-reduces gradients over the averager's whole
    group (plain DDP). Afterwards it all-reduces them within ``subgroup`` if
    one is given, which must sit below the averager's lowest level (torch's
    docstring: the intra-machine level lives in the hook); with no subgroup,
    gradients stay local and only the averager communicates.

    Returns the hook's checkpointable :class:`PostLocalSGDCounter`. Raises
    ``ValueError`` if ``subgroup`` is not smaller than, or does not divide, the
    averager's lowest level.

    Example::

        >>> # xdoctest: +SKIP("needs torchrun")
        >>> ddp = DistributedDataParallel(model)
        >>> averager = HierarchicalModelAverager({4: 4, 16: "world"}, warmup_steps=20)
        >>> hook = attach_post_local_sgd(ddp, averager)   # DDP all-reduces only during warmup

    Or keep all-reducing gradients inside pairs after warmup, below the
    averager's lowest level (groups of 4)::

        >>> # xdoctest: +SKIP("needs torchrun")
        >>> pairs, _ = dist.new_subgroups(2)
        >>> hook = attach_post_local_sgd(ddp, averager, subgroup=pairs)
    """
    if subgroup is not None:
        size, lowest = dist.get_world_size(subgroup), averager.levels[0].group_size
        if size >= lowest or lowest % size:
            raise ValueError(
                f"hook subgroup of size {size} must be smaller than, and divide, the averager's lowest "
                f"level ({lowest}); averaging the same group in both places wastes communication."
            )
    state = PostLocalSGDState(
        process_group=averager.process_group,
        subgroup=subgroup,
        start_localSGD_iter=averager.warmup_steps,
        post_local_gradient_allreduce=subgroup is not None,
    )
    ddp_model.register_comm_hook(state, post_localSGD_hook)
    return PostLocalSGDCounter(state, averager)


def next_generation(manager: CheckpointManager) -> int:
    """A job-wide start counter, kept beside the checkpoints. Collective.

    ``TORCHELASTIC_RESTART_COUNT`` differs between nodes; this does not: rank 0
    of each new world claims the next number and shares it.

    A claim is a file ``GENERATIONS/generation_<n>`` at the manager's URL,
    created exclusively (:meth:`~elastic_hsgd.checkpoint.storage.Storage.create`):
    two worlds starting at once (torchft replica groups) never get the same
    number, the one that loses the race takes the next. 0 on the first start,
    then one more on every (re)start of a world. ``GENERATION.json`` holds the
    last claim written, for people and tools (a location of an earlier version
    continues from it). :func:`resume` calls it; call it yourself only when you
    load checkpoints another way. Raises ``RuntimeError`` on every rank if rank
    0 cannot claim one.

    Example::

        >>> # xdoctest: +SKIP("needs a process group")
        >>> generation = next_generation(manager)   # the same value on every rank
    """
    value: int | None = None
    error: str | None = None
    if manager.rank == 0:
        try:
            value = _claim_generation(manager.storage)
        except Exception as exc:  # noqa: BLE001 - the other ranks wait in the gather below
            error = f"cannot claim a generation at {manager.storage.path(GENERATIONS_DIR)}: {exc!r}"
    value, error = manager.all_gather_object((value, error))[0]
    if error:
        raise RuntimeError(error)
    return value


def _claim_generation(storage: Storage) -> int:
    """Rank 0: create the first free ``GENERATIONS/generation_<n>`` above every claim, exclusively; return n."""
    folder = storage.path(GENERATIONS_DIR)
    claimed = [int(name.rsplit("_", 1)[1]) for name in storage.list_names(folder) if re.fullmatch(r"generation_\d{12}", name)]
    if claimed:
        value = max(claimed) + 1
    else:  # a location of an earlier version: continue its counter
        try:
            value = int(json.loads(storage.read_file(storage.path(GENERATION_FILE)))["generation"]) + 1
        except FileNotFoundError:
            value = 0
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("unreadable %s (%r); starting generations again at 0", storage.path(GENERATION_FILE), exc)
            value = 0
    while not storage.create(f"{folder}/generation_{value:012d}", b""):
        value += 1  # another world claimed it first
    storage.write_atomic(storage.path(GENERATION_FILE), json.dumps({"generation": value}).encode())
    for old in claimed:  # a few claims are enough to continue from
        if old < value - 8:
            storage.rm_file(f"{folder}/generation_{old:012d}")
    return value


RANK_SEED_DOMAIN = "elastic_hsgd.rank_seed"


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed of ``rank``'s random streams from ``step`` on: a pure function, in ``[0, 2**63)``.

    It is the first 8 bytes (big-endian) of
    ``sha256(f"elastic_hsgd.rank_seed/{seed}/{step}/{rank}".encode())``, with the
    top bit cleared, so it fits every seeding API (torch, numpy, Python). A fixed
    hash, not Python's salted ``hash()``: the same on every machine and run.
    Neighbouring ranks, steps and seeds get unrelated streams.

    Example::

        >>> rank_seed(0, 100, 1) == rank_seed(0, 100, 1)
        True
        >>> len({rank_seed(0, 100, rank) for rank in range(8)})
        8
    """
    return derived_seed("rank_seed", RANK_SEED_DOMAIN, seed, step, rank)


def derived_seed(caller: str, domain: str, seed: int, step: int, rank: int, *labels: str) -> int:
    """The first 8 bytes (big-endian) of ``sha256("{domain}/{seed}/{step}/{labels...}/{rank}")``, top bit cleared.

    The one hash behind :func:`rank_seed` and :func:`elastic_hsgd.ft.replica_rank_seed`; a bad
    ``seed``/``step``/``rank`` is a ``ValueError`` that names ``caller``.
    """
    for name, value, minimum in (("seed", seed, None), ("step", step, 0), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            bound = "an int" if minimum is None else f"an int >= {minimum}"
            raise ValueError(f"{caller}: {name}={value!r} must be {bound}.")
    text = "/".join([domain, str(seed), str(step), *labels, str(rank)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def seed_rank(value: int) -> None:
    """Seed torch (CPU and every CUDA device), Python's ``random`` and, if imported, numpy's global RNG."""
    torch.manual_seed(value)  # also seeds every CUDA device (lazily, where CUDA is not initialised yet)
    random.seed(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed([value & 0xFFFFFFFF, value >> 32])  # numpy takes 32-bit words


@dataclass(frozen=True)
class Resumed:
    """Where a (re)started worker begins.

    ``step`` is the number of optimizer steps already done, so the training
    loop runs ``range(step, total)``; ``checkpoint`` is the label loaded
    (equal to ``step``), or ``None`` on a fresh start. A step-0 checkpoint is
    a real checkpoint: test ``checkpoint is None``, never truthiness.

    Attributes:
        step: optimizer steps already done; 0 on a fresh start.
        previous_world_size: the world size the checkpoint was saved at, or
            ``None`` on a fresh start.
        generation: the job-wide start counter from :func:`next_generation`.
        checkpoint: the label loaded, or ``None`` on a fresh start.
        source: where the state came from: ``"local"`` (every rank read its own
            node's copy), ``"buddy"`` (some rank used a copy held on another
            node), ``"cloud"``, or ``None`` when nothing was loaded.
    """

    step: int
    previous_world_size: int | None
    generation: int
    checkpoint: int | None = None
    source: str | None = None  # "local", "buddy" or "cloud"; None when nothing was loaded


def resume(
    manager: CheckpointManager,
    state: dict[str, Any],
    averager: HierarchicalModelAverager,
    *,
    strict: bool = True,
    seed: int | None = None,
    reseed: bool = True,
) -> Resumed:
    """Load the newest checkpoint into ``state`` and log what was resumed. Collective.

    ``Resumed.step`` is the checkpoint's label, the number of optimizer steps
    done, so the training loop continues with ``range(resumed.step, steps)``;
    on a fresh start it is 0 and ``previous_world_size`` is ``None``. ``strict``
    as in :meth:`CheckpointManager.load`.

    Example::

        >>> # xdoctest: +SKIP("needs torchrun")
        >>> state = {"model": model, "optimizer": opt, "averager": averager, "post_local_sgd": hook}
        >>> start = resume(manager, state, averager).step
        >>> for step in range(start, steps):
        ...     train_one_step()
        ...     averager.average_parameters(ddp.parameters())
        ...     manager.save(step + 1, state)  # label: optimizer steps done

    The averager must already be built for the current world: its
    construction (or :meth:`~HierarchicalModelAverager.rebuild`) validated the
    hierarchy, and :meth:`~HierarchicalModelAverager.load_state_dict` checks the
    top level spans the world, all before the first averaging step. The
    checkpoint label is the number of optimizer steps done, which is also the
    averager's step (it counts ``average_parameters`` calls, one per optimizer step).

    **RNG.** A same-world resume restores every rank's saved RNG state. On a
    fresh start, or when the world size changed (then no rank's saved state is
    its own), every rank is reseeded with ``rank_seed(seed, step, rank)``
    (:func:`rank_seed`): torch (CPU and CUDA), Python's ``random`` and numpy's
    global RNG if numpy is imported, logged at INFO. The same job then draws the
    same per-rank numbers on every run, and no two ranks share a stream (e.g.
    dropout masks). ``seed=None`` takes ``torch.initial_seed()``, the seed the
    script gave ``torch.manual_seed`` before building the model; pass the run's
    seed to make it explicit. Build everything that must be equal on every rank
    (the model's initial weights) before calling ``resume``. ``reseed=False``
    leaves the RNG as it is (today's streams: equal on every rank after a world
    change). With ``CheckpointManager(include_rng=False)`` nothing is restored,
    so every resume reseeds. In torchft replica-group mode ranks repeat across
    groups: pass a seed that differs per group.
    """
    generation = next_generation(manager)
    step = manager.load_latest(state, strict=strict)
    previous = manager.last_loaded.world_size if step is not None and manager.last_loaded is not None else None
    if step is not None and averager.step != step:
        raise ValueError(f"checkpoint step {step} but the averager resumed at step {averager.step}: was it in `state`?")
    world = manager.world_size
    rng_restored = step is not None and previous == world and getattr(manager, "include_rng", True)
    if reseed and not rng_restored:
        base = torch.initial_seed() if seed is None else seed
        value = rank_seed(base, 0 if step is None else step, manager.rank)
        seed_rank(value)
        logger.info(
            "reseeded rank %d: torch seed %d from (seed %d, step %d, rank %d) (%s)",
            manager.rank, value, base, 0 if step is None else step, manager.rank,
            "fresh start" if step is None else f"world size {previous} -> {world}" if previous != world else "RNG not in the checkpoint",
        )
    if manager.rank == 0:
        if step is None:
            logger.info("generation %d: no checkpoint at %s, starting at step 0 with world size %d", generation, manager.url, world)
        else:
            logger.info("generation %d: resumed step %d from %s, world size %s -> %d", generation, step, manager.last_source, previous, world)
    return Resumed(0 if step is None else step, previous, generation, step, manager.last_source if step is not None else None)
