"""Pure DTensor slice topology (elastic_hsgd.sharding): meshes as plain data, no processes."""

from __future__ import annotations

import itertools
import random

import pytest

from elastic_hsgd.hierarchy import Level
from elastic_hsgd.sharding import (
    Mesh,
    Slice,
    check_levels,
    check_placements,
    check_same_mesh,
    chunk,
    expand_to_root,
    local_slice,
    mesh_replicas,
    placement_text,
    slice_replicas,
)

HSDP = Mesh.from_ranks([[0, 1], [2, 3]], ("replicate", "shard"))
FSDP = ["Replicate()", "Shard(0)"]


def _torch_slice(global_shape, mesh: Mesh, placements, rank):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    objects = [Shard(int(p[6:-1])) if p.startswith("Shard") else Replicate() for p in placements]
    shape, offset = _compute_local_shape_and_global_offset(global_shape, mesh.shape, list(mesh.coordinate(rank)), objects)
    return Slice(tuple(offset), tuple(shape))


def test_chunk_is_torch_chunk():
    import torch

    for size in range(0, 20):
        for chunks in range(1, 7):
            pieces = torch.arange(size).chunk(chunks)
            expected = [(int(p[0]), len(p)) for p in pieces if len(p)]
            got = [chunk(size, chunks, i) for i in range(chunks)]
            assert [g for g in got if g[1]] == expected
            assert sum(length for _, length in got) == size


def test_local_slice_matches_torch_on_many_shapes():
    rng = random.Random(0)
    meshes = [
        Mesh.from_ranks([0, 1, 2, 3]),
        Mesh.from_ranks([[0, 1], [2, 3]], ("replicate", "shard")),
        Mesh.from_ranks([[0, 1, 2], [3, 4, 5]], ("dp", "tp")),
        Mesh.from_ranks([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], ("a", "b", "c")),
        Mesh.from_ranks([[3, 1], [0, 2]], ("x", "y")),  # ranks not in order
    ]
    checked = 0
    for mesh in meshes:
        for _ in range(60):
            ndim = rng.randint(1, 3)
            shape = tuple(rng.randint(0, 9) for _ in range(ndim))
            placements = [rng.choice(["Replicate()"] + [f"Shard({d})" for d in range(ndim)]) for _ in mesh.shape]
            for rank in mesh.ranks:
                assert local_slice(shape, mesh, placements, rank) == _torch_slice(shape, mesh, placements, rank), (shape, mesh, placements, rank)
                checked += 1
    assert checked > 1000


def test_uneven_fsdp_rows_split_7_6_and_replicas_pair_across_the_replicate_dim():
    assert [local_slice((13, 5), HSDP, FSDP, r) for r in range(4)] == [
        Slice((0, 0), (7, 5)), Slice((7, 0), (6, 5)), Slice((0, 0), (7, 5)), Slice((7, 0), (6, 5))
    ]
    assert slice_replicas((13, 5), HSDP, FSDP) == {Slice((0, 0), (7, 5)): (0, 2), Slice((7, 0), (6, 5)): (1, 3)}


def test_empty_shards_are_offset_at_the_end_like_torch():
    mesh = Mesh.from_ranks([0, 1, 2, 3])
    assert local_slice((3,), mesh, ["Shard(0)"], 3) == Slice((3,), (0,))
    assert slice_replicas((3,), mesh, ["Shard(0)"])[Slice((3,), (0,))] == (3,)


def test_tensor_parallel_mesh():
    mesh = Mesh.from_ranks([[0, 1], [2, 3]], ("dp", "tp"))
    column = ["Replicate()", "Shard(1)"]  # a column-parallel weight
    assert local_slice((4, 6), mesh, column, 1) == Slice((0, 3), (4, 3))
    assert sorted(slice_replicas((4, 6), mesh, column).values()) == [(0, 2), (1, 3)]
    norm = ["Replicate()", "Replicate()"]
    assert list(slice_replicas((6,), mesh, norm).values()) == [(0, 1, 2, 3)]
    assert mesh_replicas(mesh, [column, norm]) == [(0, 1), (2, 3)]


def test_two_mesh_dims_sharding_one_tensor_dim():
    mesh = Mesh.from_ranks([[0, 1], [2, 3]], ("a", "b"))
    boxes = [local_slice((10,), mesh, ["Shard(0)", "Shard(0)"], r) for r in range(4)]
    assert boxes == [Slice((0,), (3,)), Slice((3,), (2,)), Slice((5,), (3,)), Slice((8,), (2,))]


def test_zero_dim_tensors_are_held_whole_everywhere():
    assert local_slice((), HSDP, ["Replicate()", "Replicate()"], 2) == Slice((), ())
    assert Slice((), ()).intersect(Slice((), ())) == Slice((), ())
    assert Slice((), ()).numel == 1


def test_slice_intersections():
    assert Slice((0, 0), (7, 5)).intersect(Slice((7, 0), (6, 5))) is None
    assert Slice((0,), (0,)).intersect(Slice((0,), (4,))) is None
    assert Slice((2,), (4,)).within((6,)) and not Slice((2,), (5,)).within((6,))


def test_placements_refused_with_the_parameter_named():
    from torch.distributed.tensor import Partial, Replicate, Shard

    assert placement_text(Shard(1)) == "Shard(1)" and placement_text(Replicate()) == "Replicate()"
    with pytest.raises(TypeError, match=r"layers.0.w has placement Partial.*Shard\(d\) and Replicate"):
        placement_text(Partial(), "layers.0.w")
    with pytest.raises(TypeError, match="_StridedShard"):
        from torch.distributed.tensor.placement_types import _StridedShard

        placement_text(_StridedShard(0, split_factor=2), "w")
    with pytest.raises(TypeError, match=r"fc.w has 1 placements \['Shard\(0\)'\] on mesh \(replicate=2, shard=2\)"):
        check_placements("fc.w", (4, 4), HSDP, ["Shard(0)"])
    with pytest.raises(TypeError, match=r"fc.b of shape \[4\] has placement Shard\(1\)"):
        check_placements("fc.b", (4,), HSDP, ["Replicate()", "Shard(1)"])


def test_inconsistent_meshes_are_type_errors():
    with pytest.raises(TypeError, match="distinct ranks"):
        Mesh((2, 2), (0, 1, 1, 2))
    other = Mesh.from_ranks([0, 1, 2, 3], ("shard",))
    with pytest.raises(TypeError, match=r"parameter b .*Shard\(0\).* is on mesh \(shard=4\).*but a is on mesh \(replicate=2, shard=2\)"):
        check_same_mesh([("a", HSDP, FSDP), ("b", other, ["Shard(0)"])])
    assert check_same_mesh([("a", HSDP, FSDP), ("b", HSDP, ["Replicate()", "Replicate()"])]) == HSDP


def test_fsdp_sub_mesh_expands_to_the_root_mesh():
    assert expand_to_root(Mesh.from_ranks([0, 1], ("shard",)), ["Shard(0)"], HSDP) == ("Replicate()", "Shard(0)")
    assert expand_to_root(Mesh.from_ranks([1, 3], ("replicate",)), ["Replicate()"], HSDP) == ("Replicate()", "Replicate()")
    with pytest.raises(TypeError, match="not a slice"):
        expand_to_root(Mesh.from_ranks([0, 3], ("shard",)), ["Shard(0)"], HSDP)


def test_levels_must_group_whole_replicas():
    # 2 replicas x 2 shards: a "local" level of 2 is one replica (nothing to average), world is fine.
    assert check_levels(HSDP, [FSDP], [Level(2, 2), Level(8, 4)], 4) == [Level(2, 2)]
    assert check_levels(HSDP, [FSDP], [Level(8, 4)], 4) == []
    # Replicas laid across the mesh the other way: blocks of 2 split them.
    across = Mesh.from_ranks([[0, 2], [1, 3]], ("replicate", "shard"))
    with pytest.raises(ValueError, match=r"level 0 \(period 2, group size 2\) groups ranks \[0, 1\], which splits the replica \[0, 2\] of mesh \(replicate=2, shard=2\) of ranks \[0, 2, 1, 3\].*multiples of the replica size 2"):
        check_levels(across, [FSDP], [Level(2, 2), Level(8, 4)], 4)
    # 4 replicas x 2 shards on 8 ranks: a level of 2 is a single replica, 4 is two.
    mesh8 = Mesh.from_ranks([[0, 1], [2, 3], [4, 5], [6, 7]], ("replicate", "shard"))
    assert check_levels(mesh8, [FSDP], [Level(2, 2), Level(4, 4), Level(16, 8)], 8) == [Level(2, 2)]
    with pytest.raises(ValueError, match=r"ranks \[4, 5, 6, 7\] are not in mesh"):
        check_levels(HSDP, [FSDP], [Level(8, 8)], 8)


def test_plain_replicated_mesh_has_one_rank_per_replica():
    mesh = Mesh.from_ranks([0, 1, 2, 3], ("dp",))
    assert mesh_replicas(mesh, [["Replicate()"]]) == [(0,), (1,), (2,), (3,)]
    assert check_levels(mesh, [["Replicate()"]], [Level(2, 2), Level(4, 4)], 4) == []


@pytest.mark.parametrize("shape", list(itertools.product([1, 2, 3, 5], [1, 4])))
def test_replicas_partition_the_mesh_and_slices_tile_the_tensor(shape):
    for placements in (FSDP, ["Shard(1)", "Shard(0)"], ["Replicate()", "Replicate()"]):
        replicas = slice_replicas(shape, HSDP, placements)
        assert sorted(r for ranks in replicas.values() for r in ranks) == [0, 1, 2, 3]
        assert sum(box.numel for box in replicas) == shape[0] * shape[1]
