"""Rank files are safetensors: other readers open them; hostile bytes get clean errors."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_hsgd import CheckpointManager
from elastic_hsgd.checkpoint import format as fileformat
from elastic_hsgd.checkpoint.format import FormatError, decode, encode
from elastic_hsgd.checkpoint.layout import step_dir_name

DATA = Path(__file__).parent / "data"


def _file(tree) -> bytearray:
    return bytearray(b"".join(bytes(c) for c in encode(tree)))


def test_a_rank_file_opens_with_safetensors_and_lists_the_model(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    CheckpointManager(str(tmp_path / "ckpt")).save(1, {"model": model, "optimizer": optimizer, "epoch": 3})
    path = tmp_path / "ckpt" / step_dir_name(1) / "rank_00000.safetensors"
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        assert {f"model/{k}" for k in model.state_dict()} <= names
        assert "optimizer/state/0/exp_avg" in names
        assert torch.equal(f.get_tensor("model/0.weight"), model[0].weight)
        assert json.loads(f.metadata()["tree"])  # the nested tree rides in __metadata__


def test_every_dtype_and_plain_value_round_trips_as_views_of_one_buffer():
    tensors = {str(dt): torch.arange(6).reshape(2, 3).to(dt) for dt in fileformat.DTYPES if dt.is_floating_point or dt == torch.bool or not dt.is_complex}
    tree = {"t": tensors, "empty": torch.empty(0, 5), 7: ("x", None, True, 1.5, [2, {"k": -3}]), "scalar": torch.tensor(4.0)}
    buffer = _file(tree)
    out = decode(buffer)
    assert out[7] == tree[7] and out["empty"].shape == (0, 5)
    for name, tensor in tensors.items():
        assert out["t"][name].dtype == tensor.dtype and torch.equal(out["t"][name], tensor), name
    base = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    assert base <= out["scalar"].data_ptr() < base + len(buffer)  # no copy out of the buffer
    with pytest.raises(TypeError, match="dtype"):
        encode({"q": torch.zeros(2, dtype=torch.complex128)})


def test_a_version_0_1_checkpoint_is_still_read(tmp_path):
    shutil.copytree(DATA / "checkpoint_v0.1", tmp_path / "old")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    fresh = torch.nn.Linear(3, 2)
    state = {"model": fresh, "optimizer": torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9), "epoch": 0}
    manager = CheckpointManager(str(tmp_path / "old"))
    assert manager.load_latest(state) == 4 and state["epoch"] == 2
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    manager.save(5, state)  # the next save is written in the new format
    assert (tmp_path / "old" / step_dir_name(5) / "rank_00000.safetensors").exists()


def _raw(header: bytes, data: bytes, length: int | None = None) -> bytearray:
    return bytearray(struct.pack("<Q", len(header) if length is None else length) + header + data)


def _tree_with(*names: str) -> str:
    return json.dumps({"D": [[n, {"T": n}] for n in names]})


_ints = st.one_of(st.integers(-5, 64), st.integers(2**31, 2**70), st.sampled_from([2**63 - 1, 2**64]))
_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(fileformat.TORCH_DTYPES)), st.text(max_size=6), st.integers()),
        "shape": st.one_of(st.lists(_ints, max_size=4), st.lists(st.sampled_from([0, 1, 2**40, 2**63, 2**64]), max_size=3), st.text(max_size=3)),
        "data_offsets": st.one_of(st.lists(_ints, min_size=2, max_size=2), st.just([0, 0]), st.lists(_ints, max_size=3), st.none()),
    }
)
_metadata = st.one_of(
    st.builds(lambda names: {"format": fileformat.TREE_FORMAT, "tree": _tree_with(*names)}, st.lists(st.sampled_from(["a", "b", "missing"]), max_size=3)),
    st.builds(lambda t: {"format": fileformat.TREE_FORMAT, "tree": t}, st.text(max_size=30)),
    st.just({"format": fileformat.TREE_FORMAT, "tree": "[" * 20_000}),
    st.just({"format": fileformat.TREE_FORMAT, "tree": json.dumps({"D": [[[1], 2]]})}),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    st.none(),
)


@settings(max_examples=250, deadline=2000)
@given(
    entries=st.dictionaries(st.sampled_from(["a", "b", "c"]), _entry, max_size=3),
    metadata=_metadata,
    data=st.binary(max_size=64),
    prefix=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_hostile_headers_get_clean_errors(entries, metadata, data, prefix):
    header = {**entries, **({} if metadata is None else {"__metadata__": metadata})}
    raw = _raw(json.dumps(header).encode(), data, prefix)
    try:
        decode(raw)
    except ValueError as exc:  # FormatError is a ValueError
        assert isinstance(exc, FormatError), repr(exc)


@settings(max_examples=150, deadline=2000)
@given(st.binary(max_size=200), st.integers(0, 300), st.binary(min_size=1, max_size=4))
def test_garbled_files_get_clean_errors(noise, where, patch):
    good = _file({"w": torch.arange(8.0), "i": torch.arange(3), "n": 5})
    for raw in (bytearray(noise), good[:where] + patch + good[where + len(patch) :], good[: where % len(good)]):
        # Anything but a FormatError (an IndexError, struct.error, MemoryError...) fails the test.
        try:
            decode(raw)
        except FormatError as exc:
            assert str(exc), "a refusal must say what is wrong"


def test_named_hostile_cases():
    meta = {"format": fileformat.TREE_FORMAT, "tree": _tree_with("a")}
    cases = {
        "outside": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
        "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
        "does not take": ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8),
        "unknown dtype": ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        "does not hold": ({"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        "int64": ({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}, b""),
    }
    for match, (entries, data) in cases.items():
        with pytest.raises(FormatError, match=match):
            decode(_raw(json.dumps({**entries, "__metadata__": meta}).encode(), data))
    with pytest.raises(FormatError, match="header length"):
        decode(_raw(b"{}", b"", length=2**62))
    with pytest.raises(FormatError, match="not JSON"):
        decode(_raw(b"{nope", b""))
