"""Whether the parameters being averaged belong to a DDP model that all-reduces every step anyway.

Averaging parameters only saves communication when DDP stops all-reducing
gradients after warmup, which torch's post-local-SGD hook does
(:func:`elastic_hsgd.elastic.attach_post_local_sgd` registers it). Without the
hook the averaging only adds traffic, and nothing else would say so. The
parameters do not know their module, so the check looks for the live
``DistributedDataParallel`` objects that hold them: one pass over the
garbage collector's objects, made once per averager at its first averaging
step after warmup, never on the per-step path.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable

import torch
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import post_localSGD_hook
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


def ddp_modules_without_hook(params: Iterable[torch.Tensor]) -> list[DistributedDataParallel]:
    """The live DDP modules holding any of ``params`` that have no post-local-SGD comm hook.

    A DDP whose torch keeps no record of its comm hooks (``_comm_hooks``,
    older releases) is left out: unknown is not reported.

    Example::

        >>> # xdoctest: +SKIP("needs a process group")
        >>> ddp = DistributedDataParallel(model)
        >>> ddp_modules_without_hook(ddp.parameters()) == [ddp]
        True
    """
    wanted = {id(p) for p in params}
    if not wanted:
        return []
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads obj.__class__, which some objects (torch's
        # deprecated reduce_op) answer with a warning.
        if not issubclass(type(obj), DistributedDataParallel):
            continue
        hooks = getattr(obj, "_comm_hooks", None)
        if hooks is None or any(hook is post_localSGD_hook for hook, _ in hooks):
            continue
        if any(id(p) in wanted for p in obj.parameters()):
            found.append(obj)
    return found


def warn_if_ddp_without_hook(params: Iterable[torch.Tensor], warmup_steps: int) -> None:
    """Log a WARNING if ``params`` belong to a DDP model without the post-local-SGD hook."""
    unhooked = ddp_modules_without_hook(params)
    if unhooked:
        logger.warning(
            "the parameters being averaged belong to a DistributedDataParallel module without the post-local-SGD "
            "hook, so DDP still all-reduces gradients on every step (also after warmup_steps=%d) and the averaging "
            "only adds traffic: call elastic_hsgd.elastic.attach_post_local_sgd(ddp, averager) once after building "
            "the averager (or register torch's post_localSGD_hook yourself).",
            warmup_steps,
        )
