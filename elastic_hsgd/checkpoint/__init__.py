"""Checkpoints to any fsspec URL: atomic, verified, safe, resumable at any world size."""

from .layout import CommitRecord, saved_ranks_to_read
from .manager import CheckpointManager
from .storage import CheckpointError, RetryPolicy

__all__ = ["CheckpointManager", "CheckpointError", "CommitRecord", "RetryPolicy", "saved_ranks_to_read"]
