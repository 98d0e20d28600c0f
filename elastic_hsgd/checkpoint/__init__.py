"""Checkpoints to any fsspec URL: atomic, verified, safe, resumable at any world size."""

from .layout import CommitRecord, source_rank
from .manager import CheckpointManager
from .storage import CheckpointError

__all__ = ["CheckpointManager", "CheckpointError", "CommitRecord", "source_rank"]
