"""Issue 9: the averager refuses what it cannot average correctly, and averages
odd layouts and 16-bit floats at least as well as torch's averager."""

from __future__ import annotations

import warnings

import pytest
import torch

from elastic_hsgd import HierarchicalModelAverager
from tests.distributed import run_workers


def _with_grad(tensor: torch.Tensor) -> torch.Tensor:
    tensor.grad = torch.zeros_like(tensor)
    return tensor


def test_dtensor_parameter_is_refused_at_the_first_call_naming_it(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    plain = _with_grad(torch.nn.Parameter(torch.randn(3)))
    sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 2), mesh, [Replicate()]))
    sharded.grad = distribute_tensor(torch.zeros(4, 2), mesh, [Replicate()])
    averager = HierarchicalModelAverager({2: "world"}, warmup_steps=100)  # first call is during warmup
    with pytest.raises(TypeError, match=r"parameter 1 \(DTensor, shape \[4, 2\].*DistributedDataParallel"):
        averager.average_parameters([plain, sharded])


def test_plain_tensor_subclass_is_refused(single_process_group):
    class Tagged(torch.Tensor):
        pass

    odd = _with_grad(torch.randn(5).as_subclass(Tagged))
    averager = HierarchicalModelAverager({2: "world"})
    with pytest.raises(TypeError, match=r"parameter 0 \(Tagged, shape \[5\]"):
        averager.average_parameters([odd])


def test_tensors_without_gradient_warn_once(single_process_group):
    model = torch.nn.BatchNorm1d(4)
    averager = HierarchicalModelAverager({2: "world"})
    with pytest.warns(UserWarning, match="got 3 tensors but none has a gradient"):
        averager.average_parameters(model.buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        averager.average_parameters(model.buffers())


def _models(seed: int):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 4, 3)
    linear = torch.nn.Linear(36, 10)  # 370 elements with the conv's 112: several chunks of 100
    model = torch.nn.ModuleDict({"conv": conv, "linear": linear})
    model.conv.to(memory_format=torch.channels_last)
    return model


def _copy_path_and_chunks_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    HierarchicalModelAverager.CPU_CHUNK_ELEMENTS = 100  # the chunked CPU path on a small model
    ours, theirs = _models(0), _models(0)
    for model in (ours, theirs):
        gen = torch.Generator().manual_seed(rank)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))  # ranks differ
                p.grad = torch.zeros_like(p)
    assert not ours.conv.weight.is_contiguous()  # channels_last
    averager = HierarchicalModelAverager({1: "world"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        averager.average_parameters(ours.parameters())
        averager.average_parameters(ours.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_averager = PeriodicModelAverager(period=1, warmup_steps=0)
    torch_averager.average_parameters(theirs.parameters())
    torch_averager.average_parameters(theirs.parameters())
    rest = [ours.conv.bias, ours.linear.weight, ours.linear.bias]
    return {
        "equal": all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters())),
        "warnings": [str(w.message) for w in caught],
        "conv_still_channels_last": ours.conv.weight.is_contiguous(memory_format=torch.channels_last),
        "rest_share_one_buffer": len({p.untyped_storage().data_ptr() for p in rest}) == 1,
    }


def test_odd_layout_goes_alone_through_the_copy_path_and_matches_torch_bit_for_bit():
    for report in run_workers(_copy_path_and_chunks_worker, 2, deadline_s=400):
        assert report["equal"]
        assert len(report["warnings"]) == 1 and "parameter 0 (Parameter, shape [4, 3, 3, 3]" in report["warnings"][0]
        assert report["conv_still_channels_last"] and report["rest_share_one_buffer"]


def _low_precision_worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    errors = {}
    for case, dtypes in {"bf16 only": [torch.bfloat16], "mixed": [torch.bfloat16, torch.float16, torch.float32]}.items():
        gen = torch.Generator().manual_seed(100 + rank)
        values = [(torch.randn(4096, generator=gen) * 3).to(dtype) for dtype in dtypes]
        reference = []
        for v in values:  # the exact mean, in float64
            gathered = [torch.empty(v.shape, dtype=torch.float64) for _ in range(world_size)]
            dist.all_gather(gathered, v.double())
            reference.append(torch.stack(gathered).mean(0))
        results = {}
        for name, make in {"ours": lambda: HierarchicalModelAverager({1: "world"}), "torch": lambda: PeriodicModelAverager(1, 0)}.items():
            params = [_with_grad(torch.nn.Parameter(v.clone())) for v in values]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make().average_parameters(params)
            assert [p.dtype for p in params] == dtypes
            results[name] = max((p.double() - r).abs().max().item() for p, r in zip(params, reference))
        errors[case] = results
    return errors


def test_16_bit_parameters_are_averaged_at_least_as_accurately_as_torch():
    for errors in run_workers(_low_precision_worker, 3, deadline_s=400):
        for case, result in errors.items():
            assert result["ours"] <= result["torch"], (case, result)
        assert errors["bf16 only"]["ours"] < errors["bf16 only"]["torch"]  # torch sums bf16 in bf16
