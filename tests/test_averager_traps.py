"""Training loops written the ordinary way, and what the averager does with them (issue 20, items 1, 5, 6):
gradients released right after the step, a DDP model without the post-local-SGD hook, and a model
cast after the anchors were built."""

from __future__ import annotations

import functools
import logging
import warnings

import pytest

from tests.distributed import run_workers

torch = pytest.importorskip("torch")

from elastic_hsgd import HierarchicalModelAverager  # noqa: E402

NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)


def _gathered(flat: "torch.Tensor", world_size: int) -> list:
    import torch.distributed as dist

    out = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(out, flat)
    return out


def _zero_grad_after_step_worker(rank: int, world_size: int) -> dict:
    results = {}
    for name, outer in (("plain", {}), ("outer", {4: NESTEROV})):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        averager = HierarchicalModelAverager({4: "world"}, outer_optimizers=outer)
        generator = torch.Generator().manual_seed(rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):  # step 4: the world level fires
                model(torch.randn(8, 4, generator=generator)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # the common order: no gradient left when averaging
                averager.average_parameters(model.parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        results[name] = {
            "agree": all(torch.equal(g, flat) for g in _gathered(flat, world_size)),
            "warnings": [str(w.message) for w in caught if "gradient" in str(w.message)],
        }
    return results


def test_parameters_are_averaged_after_zero_grad_set_to_none_right_after_the_step():
    for result in run_workers(_zero_grad_after_step_worker, 2):
        for name in ("plain", "outer"):
            assert result[name]["agree"], (name, result)
            assert result[name]["warnings"] == [], (name, result)


def test_a_parameter_that_requires_no_gradient_is_left_alone(single_process_group):
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    trained = torch.nn.Parameter(torch.ones(3))  # no .grad: selected by requires_grad
    averager = HierarchicalModelAverager({2: "world"})
    averager.average_parameters([trained, frozen])
    assert averager._flat._ids == (id(trained),)  # averaged (flattened) without a gradient; frozen is not


# -- item 5: DDP without the post-local-SGD hook ---------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _ddp_hook_worker(rank: int, world_size: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from elastic_hsgd.elastic import attach_post_local_sgd

    handler = _Collect()
    logging.getLogger("elastic_hsgd").addHandler(handler)
    seen: dict = {}
    for hooked in (False, True):
        handler.messages.clear()
        torch.manual_seed(0)
        ddp = DistributedDataParallel(torch.nn.Linear(4, 2))
        averager = HierarchicalModelAverager({2: "world"}, warmup_steps=3)
        if hooked:
            attach_post_local_sgd(ddp, averager)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        counts = []
        for _ in range(7):  # warmup 0..2; step 4 is the first averaging step; 6 the next
            ddp(torch.randn(4, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            averager.average_parameters(ddp.parameters())
            counts.append(sum("post-local-SGD hook" in m for m in handler.messages))
        seen["hooked" if hooked else "plain"] = {"counts": counts, "messages": list(handler.messages)}
        del ddp
    return seen


def test_ddp_without_the_post_local_sgd_hook_warns_once_at_the_first_averaging_step():
    for result in run_workers(_ddp_hook_worker, 2, deadline_s=180):
        assert result["plain"]["counts"] == [0, 0, 0, 0, 1, 1, 1], result
        message = next(m for m in result["plain"]["messages"] if "post-local-SGD hook" in m)
        assert "DistributedDataParallel" in message and "attach_post_local_sgd" in message
        assert result["hooked"]["counts"] == [0] * 7, result


# -- item 6: a cast after the anchors were built ---------------------------------------------------


def test_a_cast_after_the_first_call_says_what_changed_and_what_to_do(single_process_group):
    model = torch.nn.Linear(24, 24)  # 600 elements
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    averager = HierarchicalModelAverager({2: "world"}, outer_optimizers={2: NESTEROV})
    averager.average_parameters(model.parameters())  # step 0: anchors built in float32
    averager.average_parameters(model.parameters())
    model.double()
    with pytest.raises(ValueError) as info:
        averager.average_parameters(model.parameters())  # step 2: the level fires
    message = str(info.value)
    assert "dtype torch.float32 -> torch.float64" in message, message
    assert "before the first call" in message and "model.to(" in message, message
