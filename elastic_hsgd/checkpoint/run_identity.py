"""Which run a checkpoint belongs to: the cloud location, and the run id kept there.

A node-local folder outlives a job: a new job with the same ``local_url``
must not resume the old job's local steps. So the cloud tier keeps a run id at
its location, ``<url>/RUN_ID``, created by rank 0 on the run's first save or
load, exclusively (:meth:`~.storage.Storage.create`: of two starts racing, one
creates it and both read that one). Every local commit record carries a
:class:`RunStamp`: the cloud URL, the run id, and the newest cloud step
committed when it was saved. A local step is loaded only if its stamp is this
run's (:func:`foreign_reason`).

A cloud URL reused after its steps were deleted keeps its ``RUN_ID`` (unless
the folder was deleted whole), so the stamp's cloud step decides: a local step
saved after cloud step ``n`` belongs to a timeline the location no longer has
when the cloud's newest step is older than ``n`` (or there is none), and is
not loaded. A local step saved before the run's first cloud save (stamp
``cloud_step`` ``None``) stays loadable: that is a crash before the first
cloud checkpoint, the case the local tier is for.

Example::

    >>> stamp = RunStamp("s3://bucket/run-1", "0f3c", cloud_step=100)
    >>> foreign_reason(stamp.to_json(), RunStamp("s3://bucket/run-1", "0f3c", cloud_step=200)) is None
    True
    >>> foreign_reason(stamp.to_json(), RunStamp("s3://bucket/run-2", "77aa", cloud_step=None))
    "it belongs to another run (run id '0f3c' of s3://bucket/run-1; this is run id '77aa' of s3://bucket/run-2)"
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .layout import RUN_ID_NAME
from .storage import CheckpointError, Storage


@dataclass(frozen=True)
class RunStamp:
    """A run's identity as a local commit record carries it (``extra["run"]``)."""

    cloud_url: str
    run_id: str
    cloud_step: int | None  # the newest cloud step committed when the local step was saved

    def to_json(self) -> dict[str, Any]:
        """The stamp as plain JSON, for a commit record."""
        return {"cloud_url": self.cloud_url, "run_id": self.run_id, "cloud_step": self.cloud_step}


def foreign_reason(saved: Any, current: RunStamp) -> str | None:
    """Why a local step stamped ``saved`` (its record's ``extra["run"]``) is not this run's; ``None`` if it is."""
    if not isinstance(saved, dict) or not isinstance(saved.get("run_id"), str):
        return "it carries no run identity (saved by an older version, or by another tool)"
    if saved["run_id"] != current.run_id or saved.get("cloud_url") != current.cloud_url:
        return (
            f"it belongs to another run (run id {saved['run_id']!r} of {saved.get('cloud_url')}; "
            f"this is run id {current.run_id!r} of {current.cloud_url})"
        )
    base = saved.get("cloud_step")
    if isinstance(base, int) and (current.cloud_step is None or current.cloud_step < base):
        return (
            f"it was saved after cloud step {base}, which {current.cloud_url} no longer has (its newest is "
            f"{current.cloud_step}): the cloud steps were deleted and the URL reused"
        )
    return None


def ensure_run_id(storage: Storage, *, settle_s: float = 5.0) -> str:
    """The run id at ``storage``'s root, created (exclusively) if there is none. Not collective: rank 0 calls it.

    Raises :class:`~.storage.CheckpointError` if the file exists but stays
    unreadable (a racer's write may briefly show an empty file where the
    filesystem has no atomic exclusive create, so it is read again for
    ``settle_s``).
    """
    path = storage.path(RUN_ID_NAME)
    storage.create(path, json.dumps({"run_id": uuid.uuid4().hex, "created_unix_time": time.time()}).encode())
    deadline = time.monotonic() + settle_s
    while True:
        try:
            run_id = json.loads(storage.read_file(path, max_bytes=4096))["run_id"]
            if isinstance(run_id, str) and run_id:
                return run_id
            problem: Exception = ValueError(f"run_id is {run_id!r}")
        except (ValueError, KeyError, TypeError) as exc:
            problem = exc
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"{storage.fs.unstrip_protocol(path)} is unreadable ({problem!r}): it names the run whose node-local "
                "checkpoints may be resumed. Delete it to give the location a new run id (local steps saved "
                "before are then not resumed)."
            )
        time.sleep(0.05)
