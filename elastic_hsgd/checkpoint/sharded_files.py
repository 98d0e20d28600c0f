"""Saved rank files as a sharded loader reads them: a header, then byte ranges.

Two sources give the same three things (:class:`SavedFiles`): a rank file's
index (tree and tensor table, :mod:`.rank_index`), bytes of it by range, and
the whole verified payload for an exact resume.

- :class:`RangedFiles` reads a step at a storage URL by byte range: the
  headers, then only the ranges a rank needs. A whole-file checksum cannot be
  checked from ranges, so :meth:`RangedFiles.verify` streams one file through
  CRC-32 (each new rank verifies its share of the saved files, as a resume
  at another world size always did).
- :class:`FetchedFiles` serves any tier's :class:`~.tiers.StepReader`: each
  saved rank's payload is fetched (verified) once and kept, and its index and
  ranges are those of the file it would encode to.

Example::

    >>> # xdoctest: +SKIP("needs a checkpoint")
    >>> files = RangedFiles(storage, reader)
    >>> index = files.index(1)                              # the header only
    >>> files.read_many(1, [(index.tensors["model/0.weight/local"].start, 20)])
"""

from __future__ import annotations

import bisect
import json
import zlib
from typing import Any, Protocol

from . import format as fileformat
from .commit import Unusable
from .layout import CommitRecord
from .rank_index import RankIndex, TensorSpec, rank_file, read_index, read_range
from .storage import READ_CHUNK_BYTES, CheckpointError, Storage


class SavedFiles(Protocol):
    record: CommitRecord
    bytes_read: int  # tensor bytes read by range so far (for measurements)

    def index(self, saved_rank: int) -> RankIndex:
        """The saved rank's tree and tensor table."""

    def read_many(self, saved_rank: int, spans: list[tuple[int, int]]) -> list[bytes | memoryview]:
        """Bytes ``[start, start + nbytes)`` of the saved rank's file for each ``(start, nbytes)`` of ``spans``."""

    def verify(self, saved_rank: int) -> None:
        """Raise :class:`~.commit.Unusable` unless the saved rank's file matches its commit record."""

    def fetch(self, saved_rank: int) -> dict[str, Any]:
        """The saved rank's whole payload, decoded and verified."""


class RangedFiles:
    """A step's rank files at ``storage``, read header first and then by byte range."""

    def __init__(self, storage: Storage, reader: Any) -> None:
        self.storage = storage
        self.record: CommitRecord = reader.record
        self.fetch = reader.fetch
        self.bytes_read = 0
        self._indexes: dict[int, tuple[str, RankIndex]] = {}

    def _file(self, saved_rank: int) -> tuple[str, RankIndex]:
        if saved_rank not in self._indexes:
            try:  # a missing file, a size other than recorded, a header that does not parse: fall back past it
                path, size = rank_file(self.storage, self.record, saved_rank)
                self._indexes[saved_rank] = (path, read_index(self.storage, path, size, self.record.format))
            except (ValueError, CheckpointError) as exc:
                raise Unusable(str(exc)) from None
        return self._indexes[saved_rank]

    def index(self, saved_rank: int) -> RankIndex:
        return self._file(saved_rank)[1]

    def read_many(self, saved_rank: int, spans: list[tuple[int, int]]) -> list[bytes]:
        """One request for all ``spans`` (fsspec's ``cat_ranges``: concurrent on object stores), retried as a whole."""
        path = self._file(saved_rank)[0]
        spans = [(start, nbytes) for start, nbytes in spans]
        if len(spans) == 1:
            data = [read_range(self.storage, path, *spans[0])]
        else:
            where = self.storage.fs.unstrip_protocol(path)
            starts, ends = [s for s, _ in spans], [s + n for s, n in spans]
            data = self.storage.policy.call(f"reading {len(spans)} ranges of {where}", lambda: self.storage.fs.cat_ranges([path] * len(spans), starts, ends))
            for (start, nbytes), got in zip(spans, data):
                if isinstance(got, Exception) or len(got) != nbytes:
                    raise CheckpointError(f"{where}: read {got!r:.80} at offset {start}, expected {nbytes} bytes (truncated file?)")
        self.bytes_read += sum(n for _, n in spans)
        return data

    def verify(self, saved_rank: int) -> None:
        """Stream the file through CRC-32 (one chunk in memory) and compare with the commit record."""
        entry = self.record.file_for_rank(saved_rank)
        path, _ = self._file(saved_rank)

        def checksum() -> tuple[str, int]:
            crc, seen = 0, 0
            with self.storage.fs.open(path, "rb") as f:
                while chunk := f.read(READ_CHUNK_BYTES):
                    crc, seen = zlib.crc32(chunk, crc), seen + len(chunk)
            return f"crc32:{crc:08x}", seen

        crc, seen = self.storage.policy.call(f"verifying {self.storage.fs.unstrip_protocol(path)}", checksum)
        if seen != entry.bytes:
            raise Unusable(f"{entry.name} is {seen} bytes, its commit record says {entry.bytes}")
        if crc != entry.checksum:
            raise Unusable(f"{entry.name} is corrupt: its checksum differs from the commit record")


class FetchedFiles:
    """A step any tier can fetch, file by file: each payload fetched once and served by range from memory."""

    def __init__(self, reader: Any) -> None:
        self.record: CommitRecord = reader.record
        self._fetch = reader.fetch
        self.bytes_read = 0
        self._files: dict[int, tuple[RankIndex, list[int], list[Any]]] = {}
        self._payloads: dict[int, dict[str, Any]] = {}

    def fetch(self, saved_rank: int) -> dict[str, Any]:
        """The payload, fetched once: an exact resume reads its own file after its index."""
        self._files.pop(saved_rank, None)
        payload = self._payloads.pop(saved_rank, None)
        return payload if payload is not None else self._fetch(saved_rank)

    def _file(self, saved_rank: int) -> tuple[RankIndex, list[int], list[Any]]:
        if saved_rank not in self._files:
            self._payloads[saved_rank] = payload = self._fetch(saved_rank)
            chunks = fileformat.encode(payload)  # views of the fetched tensors: no copy
            header, data_start = fileformat.read_header(chunks[0])
            tensors = {}
            for name, entry in header.items():
                if name != "__metadata__":
                    begin, end = entry["data_offsets"]
                    tensors[name] = TensorSpec(fileformat.TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin, end - begin)
            starts, position = [], 0
            for chunk in chunks:
                starts.append(position)
                position += memoryview(chunk).nbytes
            tree = json.loads(header["__metadata__"]["tree"])
            self._files[saved_rank] = (RankIndex(tree, tensors), starts, chunks)
        return self._files[saved_rank]

    def index(self, saved_rank: int) -> RankIndex:
        return self._file(saved_rank)[0]

    def read_many(self, saved_rank: int, spans: list[tuple[int, int]]) -> list[bytes | memoryview]:
        """Views of the fetched tensors' memory; a span over several tensors is copied out of them."""
        _, starts, chunks = self._file(saved_rank)
        out: list[bytes | memoryview] = []
        for start, nbytes in spans:
            i = bisect.bisect_right(starts, start) - 1
            pieces = []
            while nbytes and i < len(chunks):
                view = memoryview(chunks[i]).cast("B")[start - starts[i] :]
                pieces.append(view[:nbytes])
                start, nbytes, i = start + len(pieces[-1]), nbytes - len(pieces[-1]), i + 1
            if nbytes:
                raise Unusable(f"saved rank {saved_rank}: a range ends {nbytes} bytes past the end of the file")
            out.append(b"" if not pieces else pieces[0] if len(pieces) == 1 else b"".join(pieces))
        self.bytes_read += sum(n for _, n in spans)
        return out

    def verify(self, saved_rank: int) -> None:
        """Nothing to do: the tier verified each payload it fetched."""
