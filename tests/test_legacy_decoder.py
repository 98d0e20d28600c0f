"""The 0.1 (``.ehsgd``) rank-file decoder on hostile input: every refusal is a clean CheckpointError."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch

from elastic_hsgd.checkpoint import tensorfile
from elastic_hsgd.checkpoint.state import deserialize
from elastic_hsgd.checkpoint.storage import CheckpointError

LEGACY = (Path(__file__).parent / "data" / "checkpoint_v0.1" / "step_000000000004" / "rank_00000.ehsgd").read_bytes()


def _parts(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16 : 16 + length])
    base = 16 + length + (-(16 + length) % tensorfile.ALIGN)
    return header, data[base:]


def _file(header, tensor_bytes: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    head = tensorfile.MAGIC + struct.pack("<Q", len(raw)) + raw
    return head + b"\0" * (-len(head) % tensorfile.ALIGN) + tensor_bytes


def test_the_real_legacy_file_still_decodes():
    payload = deserialize(bytearray(LEGACY))
    assert payload["model"]["weight"].shape == (2, 3) and payload["epoch"] == 2


def _hostile() -> dict[str, bytes]:
    header, data = _parts(LEGACY)

    def edited(fn) -> bytes:
        h = json.loads(json.dumps(header))
        fn(h)
        return _file(h, data)

    deep = "[" * 100_000 + "]" * 100_000
    return {
        "no tensors key": edited(lambda h: h.pop("tensors")),
        "no tree key": edited(lambda h: h.pop("tree")),
        "tensor index out of range": edited(lambda h: h.__setitem__("tree", {"T": 99})),
        "negative tensor index": edited(lambda h: h.__setitem__("tree", {"T": -1})),
        "tensor index not an int": edited(lambda h: h.__setitem__("tree", {"T": "0"})),
        "entry without dtype": edited(lambda h: h["tensors"][0].pop("dtype")),
        "entry not an object": edited(lambda h: h["tensors"].__setitem__(0, 5)),
        "unknown dtype": edited(lambda h: h["tensors"][0].__setitem__("dtype", "float99")),
        "dtype not a string": edited(lambda h: h["tensors"][0].__setitem__("dtype", ["float32"])),
        "shape not a list": edited(lambda h: h["tensors"][0].__setitem__("shape", 6)),
        "negative size": edited(lambda h: h["tensors"][0].__setitem__("shape", [-2, -3])),
        "huge size": edited(lambda h: h["tensors"][0].__setitem__("shape", [2**62, 2**62])),
        "negative offset": edited(lambda h: h["tensors"][1].__setitem__("offset", -64)),
        "offset past the end": edited(lambda h: h["tensors"][1].__setitem__("offset", 10**12)),
        "nbytes not an int": edited(lambda h: h["tensors"][0].__setitem__("nbytes", "24")),
        "node with two tags": edited(lambda h: h.__setitem__("tree", {"D": [], "L": []})),
        "empty node": edited(lambda h: h.__setitem__("tree", {})),
        "unknown tag": edited(lambda h: h.__setitem__("tree", {"X": 1})),
        "dict body not pairs": edited(lambda h: h.__setitem__("tree", {"D": [[1, 2, 3]]})),
        "dict body not a list": edited(lambda h: h.__setitem__("tree", {"D": 5})),
        "unhashable key": edited(lambda h: h.__setitem__("tree", {"D": [[{"L": [1]}, 2]]})),
        "list body not a list": edited(lambda h: h.__setitem__("tree", {"L": 5})),
        "tree nested past the recursion limit": _file(_nested_tree_header(header, 5000), data),
        "header nested past the recursion limit": _file(deep.encode(), data),
        "header not JSON": _file(b"{not json", data),
        "header not UTF-8": _file(b"\xff\xfe", data),
        "header a list": _file(b"[1, 2]", data),
        "header length past the end": LEGACY[:8] + struct.pack("<Q", 10**15) + LEGACY[16:],
        "truncated before the length": LEGACY[:12],
        "truncated tensor bytes": LEGACY[: len(LEGACY) - 60],  # into the last tensor (the rest is padding)
    }


def _nested_tree_header(header: dict, depth: int) -> bytes:
    """A header whose tree nests ``depth`` lists deep (JSON text: json.dumps would hit the limit itself)."""
    tree = '{"L": [' * depth + "1" + "]}" * depth
    return f'{{"tree": {tree}, "tensors": {json.dumps(header["tensors"])}}}'.encode()


@pytest.mark.parametrize("case", sorted(_hostile()))
def test_hostile_legacy_input_is_a_checkpoint_error(case):
    data = _hostile()[case]
    for decode in (tensorfile.decode, lambda d: deserialize(bytearray(d))):
        with pytest.raises(CheckpointError, match="elastic_hsgd 0.1"):
            decode(data)


def test_fuzzed_legacy_files_decode_or_raise_checkpoint_error():
    rng = random.Random(0)
    for _ in range(400):
        data = bytearray(LEGACY)
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            at = rng.randrange(len(data))
            if kind < 0.6:
                data[at] = rng.randrange(256)
            elif kind < 0.8:
                del data[at : at + rng.randint(1, 40)]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        data[:8] = tensorfile.MAGIC  # always reach the legacy decoder
        try:
            payload = tensorfile.decode(bytes(data))
        except CheckpointError:
            continue
        assert isinstance(payload, (dict, list, tuple, int, float, str, bool, torch.Tensor)) or payload is None
