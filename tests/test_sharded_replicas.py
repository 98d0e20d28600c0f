"""The ``"replicas"`` top level with sharded replica groups (issue 21), in real gloo processes.

Four processes form two replica groups of two ranks, each its own default process group
as two torchrun jobs would be, and each group is one FSDP2 replica sharded over its two
ranks. The top level is the real :class:`elastic_hsgd.ft.ReplicaGroups` with a stand-in
for torchft's Manager whose allreduce pairs rank ``r`` of one group with rank ``r`` of the
other, as torchft's does: each rank exchanges its own shards, and after a committed sync
both groups hold the mean of the two replicas.
"""

from __future__ import annotations

import pytest

from tests.distributed import free_port, run_workers

torch = pytest.importorskip("torch")

GROUP = 2


class PairedManager:
    """torchft's Manager as ReplicaGroups uses it: quorum calls, an AVG allreduce over the ranks of the same
    group rank in every group (``cross``), and a commit that always succeeds."""

    _healing = False

    def __init__(self, cross) -> None:
        self.cross = cross

    def start_quorum(self) -> None:
        pass

    def wait_quorum(self) -> None:
        pass

    def allreduce(self, tensor):
        work = self.cross.allreduce([tensor])
        cross = self.cross

        class Averaged:
            def wait(self) -> None:
                work.wait()
                tensor.div_(cross.size())

        return Averaged()

    def should_commit(self) -> bool:
        return True

    def num_participants(self) -> int:
        return self.cross.size()

    def errored(self):
        return None


class Transport:
    last_received = None


def _worker(rank: int, world_size: int, ports: list[int]) -> dict:
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from elastic_hsgd import HierarchicalModelAverager
    from elastic_hsgd.ft.replicas import ReplicaGroups
    from tests.test_sharded_averaging import _model

    group, group_rank = divmod(rank, GROUP)
    dist.destroy_process_group()
    timeout = timedelta(seconds=60)
    # Rank r of each group, and every rank (only to read the replicas for the check below).
    pair_store = dist.TCPStore("127.0.0.1", ports[group_rank], 2, is_master=group == 0, timeout=timeout)
    cross = dist.ProcessGroupGloo(pair_store, group, 2, timeout)
    all_store = dist.TCPStore("127.0.0.1", ports[2], world_size, is_master=rank == 0, timeout=timeout)
    everyone = dist.ProcessGroupGloo(all_store, rank, world_size, timeout)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[3 + group]}", rank=group_rank, world_size=GROUP, timeout=timeout)

    mesh = init_device_mesh("cpu", (1, GROUP), mesh_dim_names=("replicate", "shard"))
    model = _model()
    for block in model:
        if list(block.parameters()):
            fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    top = ReplicaGroups()
    top.attach(PairedManager(cross), Transport())
    averager = HierarchicalModelAverager({3: "replicas"}, top_level=top)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def replicas() -> list[torch.Tensor]:
        full = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
        out = [torch.empty_like(full) for _ in range(world_size)]
        everyone.allgather([out], [full]).wait()
        return out

    worst, apart = 0.0, 0.0
    for step in range(7):
        batch = torch.randn(4, 5, generator=torch.Generator().manual_seed(100 * group + 10 * group_rank + step))
        model(batch).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        before = replicas()
        averager.average_parameters(model.parameters())
        if step % 3 == 0:  # the top level fired: every rank holds the mean of the two groups' replicas
            after = replicas()
            apart = max(apart, (before[0] - before[GROUP]).abs().max().item())
            expected = (before[0] + before[GROUP]) / 2
            worst = max(worst, max((a - expected).abs().max().item() for a in after))
    local = sum(p.to_local().numel() for p in model.parameters())
    result = {
        "worst": worst, "apart": apart, "cross bytes": top.cross_group_bytes_last_sync, "local elements": local,
        "layout": averager.state_dict()["shard_layout"],
    }
    dist.destroy_process_group()
    return result


def test_replicas_level_averages_each_shard_with_the_same_rank_of_the_other_groups():
    ports = [free_port() for _ in range(5)]
    results = run_workers(_worker, 4, ports, deadline_s=300)
    for result in results:
        assert result["apart"] > 1e-4 and result["worst"] <= 1e-6, result
    # Each rank sends only its own (padded) shards across groups: 7 rows of 13 x 5 + 13 and of 13 + 13, 2 of 3 x 13 + 3.
    assert {r["cross bytes"] for r in results} == {4 * (7 * 5 + 7 + 7 + 7 + 2 * 13 + 2)}
    assert len({r["layout"] for r in results}) == 1  # both groups shard the same way


# -- a heal from a group that shards the model otherwise: refused by the heal's own load ---------


def _heal_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from elastic_hsgd import HierarchicalModelAverager
    from elastic_hsgd.checkpoint import format as fileformat
    from elastic_hsgd.checkpoint.state import capture, copy_to_cpu
    from elastic_hsgd.ft.heal_client import HealRefused
    from elastic_hsgd.ft.wiring import load_heal
    from tests.test_sharded_averaging import _model, _shard

    def group_state(shape: tuple[int, int], shift: float) -> dict:
        model = _shard(_model(), init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))["shard"])
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().add_(shift)  # another group's training
        averager = HierarchicalModelAverager({2: "world"})
        averager.average_parameters(model.parameters())  # the first call sees the parameters: their shard layout
        return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "averager": averager}

    def wire(state: dict) -> dict:  # what the heal transport sends: the captured state, encoded and decoded
        return fileformat.decode(bytearray(b"".join(bytes(c) for c in fileformat.encode(copy_to_cpu(capture(state, include_rng=False))))))

    def shards(state: dict) -> list[torch.Tensor]:
        return [p.to_local().detach().clone() for p in state["model"].parameters()]

    mine = group_state((1, 2), 0.0)  # 1 replica x 2 shards
    before = shards(mine)
    out: dict = {}
    try:
        load_heal(mine, wire(group_state((2, 1), 1.0)))  # a peer group of 2 replicas x 1 shard
    except HealRefused as exc:
        out["refused"] = str(exc)
    out["untouched"] = all(torch.equal(a, b) for a, b in zip(before, shards(mine)))
    peer = group_state((1, 2), 2.0)  # sharded the same way: rank r loads rank r's shards
    load_heal(mine, wire(peer))
    out["healed"] = all(torch.equal(a, b) for a, b in zip(shards(peer), shards(mine))) and not all(
        torch.equal(a, b) for a, b in zip(before, shards(mine))
    )
    return out


def test_a_heal_payload_sharded_otherwise_is_refused_before_anything_loads():
    for result in run_workers(_heal_worker, 2, deadline_s=300):
        assert "shards the model otherwise" in result.get("refused", ""), result
        assert "--shard-size" in result["refused"]
        assert result["untouched"] and result["healed"], result
