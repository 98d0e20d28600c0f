"""The pure reshard plan and layout records of sharded checkpoints (checkpoint/sharded.py), without processes."""

from __future__ import annotations

import random

import pytest
import torch

from elastic_hsgd.checkpoint.sharded import ShardLayout, byte_ranges, coalesce, parse_record, plan_slice
from elastic_hsgd.checkpoint.sharded_load import check_layouts
from elastic_hsgd.checkpoint.storage import CheckpointError
from elastic_hsgd.sharding import Mesh, Slice, local_slice

MESHES = [
    (Mesh.from_ranks([[0, 1], [2, 3]], ("replicate", "shard")), ["Replicate()", "Shard(0)"]),  # FSDP 2 x 2
    (Mesh.from_ranks([0, 1, 2, 3], ("shard",)), ["Shard(0)"]),  # 1 x 4
    (Mesh.from_ranks([[0], [1]], ("replicate", "shard")), ["Replicate()", "Shard(0)"]),  # 2 x 1
    (Mesh.from_ranks([[0, 1], [2, 3]], ("dp", "tp")), ["Replicate()", "Shard(1)"]),  # tensor parallel, columns
    (Mesh.from_ranks([[0, 1, 2]], ("a", "b")), ["Shard(1)", "Shard(0)"]),
]


def _shards(tensor: torch.Tensor, mesh: Mesh, placements) -> dict[int, tuple[Slice, bytes]]:
    out = {}
    for rank in mesh.ranks:
        box = local_slice(tuple(tensor.shape), mesh, placements, rank)
        index = tuple(slice(o, o + n) for o, n in zip(box.offset, box.size))
        out[rank] = (box, tensor[index].contiguous().numpy().tobytes())
    return out


def _assemble(target: Slice, saved: dict[int, tuple[Slice, bytes]], shape, dtype) -> torch.Tensor:
    """The target box from the plan's byte ranges only, the replicas of each box averaged."""
    out = torch.zeros(target.size, dtype=torch.float64)
    for piece in plan_slice(target, {r: box for r, (box, _) in saved.items()}, shape, dtype.itemsize):
        index = tuple(slice(b - t, b - t + n) for b, t, n in zip(piece.box.offset, target.offset, piece.box.size))
        total = torch.zeros(piece.box.size, dtype=torch.float64)
        for read in piece.reads:
            data = b"".join(saved[read.saved_rank][1][start : start + n] for start, n in read.ranges)
            total += torch.frombuffer(bytearray(data), dtype=dtype).reshape(piece.box.size)
        out[index] = total / len(piece.reads)
    return out


def test_every_new_box_is_read_from_the_saved_boxes_on_random_shapes():
    rng = random.Random(0)
    checked = 0
    for _ in range(40):
        shape = (rng.randint(1, 11), rng.randint(1, 7))
        tensor = torch.randn(shape)
        for saved_mesh, saved_placements in MESHES:
            saved = _shards(tensor, saved_mesh, saved_placements)
            for mesh, placements in MESHES:
                for rank in mesh.ranks:
                    target = local_slice(shape, mesh, placements, rank)
                    index = tuple(slice(o, o + n) for o, n in zip(target.offset, target.size))
                    assert torch.equal(_assemble(target, saved, shape, torch.float32), tensor[index].double())
                    checked += 1
    assert checked > 3000


def test_the_mean_of_replicas_slice_by_slice():
    a, b = torch.randn(13, 5), torch.randn(13, 5)
    mesh, placements = MESHES[0]
    saved = {r: v for r, v in _shards(a, mesh, placements).items() if r in (0, 1)}
    saved.update({r: v for r, v in _shards(b, mesh, placements).items() if r in (2, 3)})
    target = Slice((4, 0), (4, 5))  # rows 4..7 of 1 x 4: from both saved boxes of each replica
    assert torch.equal(_assemble(target, saved, (13, 5), torch.float32), ((a.double() + b.double()) / 2)[4:8])


def test_uneven_and_empty_shards_plan():
    saved = {0: Slice((0, 0), (7, 5)), 1: Slice((7, 0), (6, 5)), 2: Slice((0, 0), (7, 5)), 3: Slice((7, 0), (6, 5))}
    pieces = plan_slice(Slice((4, 0), (4, 5)), saved, (13, 5), 4)
    assert [p.box for p in pieces] == [Slice((4, 0), (3, 5)), Slice((7, 0), (1, 5))]
    assert [[(r.saved_rank, r.ranges) for r in p.reads] for p in pieces] == [
        [(0, ((80, 60),)), (2, ((80, 60),))],
        [(1, ((0, 20),)), (3, ((0, 20),))],
    ]
    assert plan_slice(Slice((3,), (0,)), {0: Slice((0,), (3,))}, (3,), 4) == []  # an empty new shard reads nothing
    empty = {0: Slice((0,), (1,)), 1: Slice((1,), (1,)), 2: Slice((2,), (1,)), 3: Slice((3,), (0,))}
    assert [p.reads[0].saved_rank for p in plan_slice(Slice((0,), (3,)), empty, (3,), 4)] == [0, 1, 2]


def test_zero_dim_tensors_plan_to_one_read_per_replica():
    (piece,) = plan_slice(Slice((), ()), {0: Slice((), ()), 1: Slice((), ())}, (), 4)
    assert [(r.saved_rank, r.ranges) for r in piece.reads] == [(0, ((0, 4),)), (1, ((0, 4),))]


def test_byte_ranges_of_boxes_that_do_not_span_the_inner_dims():
    shard = Slice((0, 0, 0), (2, 3, 4))
    assert byte_ranges(shard, Slice((0, 0, 0), (2, 3, 4)), 2) == [(0, 48)]
    assert byte_ranges(shard, Slice((1, 1, 0), (1, 2, 4)), 2) == [(32, 16)]
    assert byte_ranges(shard, Slice((0, 1, 1), (2, 1, 2)), 1) == [(5, 2), (17, 2)]
    with pytest.raises(ValueError, match="not inside"):
        byte_ranges(shard, Slice((0, 0, 0), (3, 1, 1)), 1)


def test_coalesce_merges_near_ranges_only():
    assert coalesce([(0, 8), (8, 8)], max_gap=0) == [(0, 16, [(0, 8), (8, 8)])]
    assert coalesce([(0, 8), (20, 4)], max_gap=4) == [(0, 8, [(0, 8)]), (20, 4, [(0, 4)])]
    assert coalesce([]) == []


def test_overlapping_or_missing_saved_boxes_are_refused():
    with pytest.raises(CheckpointError, match=r"w: saved ranks \[1\] .* hold overlapping parts"):
        plan_slice(Slice((0,), (10,)), {0: Slice((0,), (6,)), 1: Slice((5,), (5,))}, (10,), 4, "w")
    with pytest.raises(CheckpointError, match=r"w: the saved shards hold 8 of the 10 elements .* missing from every rank file"):
        plan_slice(Slice((0,), (10,)), {0: Slice((0,), (5,)), 1: Slice((7,), (3,))}, (10,), 4, "w")
    with pytest.raises(CheckpointError, match="leaves the global shape"):
        plan_slice(Slice((0,), (10,)), {0: Slice((0,), (11,))}, (10,), 4, "w")


def _record(rank: int = 1, **changes):
    mesh = Mesh.from_ranks([0, 1], ("shard",))
    layout = ShardLayout((13, 5), local_slice((13, 5), mesh, ["Shard(0)"], rank), mesh, ("Shard(0)",))
    record = layout.record(None)
    record.update(changes)
    return record


def test_layout_records_round_trip_and_hostile_records_are_refused():
    assert parse_record(_record(), (6, 5), 1, "r1").box == Slice((7, 0), (6, 5))
    cases = [
        (_record(size=[7, 5]), "has shape [6, 5] but its record says size [7, 5]"),
        (_record(offset=[6, 0]), "claims the box at offset [6, 0] of size [6, 5], but its mesh"),
        (_record(offset=[9, 0]), "leaves the global shape [13, 5]"),
        (_record(offset=[7]), "has 1 dims, expected 2"),
        (_record(placements=["Partial(sum)"]), "malformed layout: the tensor has placement Partial"),
        (_record(mesh={"shape": [2], "ranks": [0, 0], "dims": None}), "distinct ranks"),
        (_record(mesh={"shape": [2], "ranks": [2, 3], "dims": None}), "rank 1 is not in mesh"),
        (_record(global_shape="13"), "not a list of sizes"),
        ({**_record(), "extra": 1}, "fields"),
    ]
    for record, message in cases:
        with pytest.raises(CheckpointError, match="r1: .*" + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
            parse_record(record, (6, 5), 1, "r1")


def test_check_layouts_names_what_is_missing():
    w = ("model", "w")
    good = {0: {w: ((4,), (0,), (2,), "F32", 0, 8)}, 1: {w: ((4,), (2,), (2,), "F32", 0, 8)}}
    check_layouts(good, 2, "load")
    with pytest.raises(CheckpointError, match=r"saved ranks \[1\] lack the sharded tensor model/w"):
        check_layouts({0: good[0], 1: {}}, 2, "load")
    with pytest.raises(CheckpointError, match="hold 2 of the 4 elements"):
        check_layouts({0: good[0], 1: {w: ((4,), (0,), (2,), "F32", 0, 8)}}, 2, "load")
    with pytest.raises(CheckpointError, match="disagree on its global shape"):
        check_layouts({0: good[0], 1: {w: ((5,), (2,), (2,), "F32", 0, 8)}}, 2, "load")
