"""A pickle-free :class:`torchft.checkpointing.CheckpointTransport` over HTTP.

torchft's bundled transports run code from the wire (``HTTPTransport`` loads
with ``torch.load(weights_only=False)``, ``PGTransport`` unpickles metadata), so
any peer, or anyone who can reach the port, could run code in a joining group.
This one carries the checkpoint byte format of :mod:`elastic_hsgd.checkpoint`
(a JSON tree plus raw tensor bytes): decoding never imports or calls anything,
and bytes in any other format are refused with ``ValueError``.

Example::

    >>> from datetime import timedelta
    >>> import torch
    >>> sender, joiner = SafeHTTPTransport(timedelta(seconds=5)), SafeHTTPTransport(timedelta(seconds=5))
    >>> sender.send_checkpoint([1], step=3, state_dict={"w": torch.ones(2)}, timeout=timedelta(seconds=5))
    >>> joiner.recv_checkpoint(0, sender.metadata(), step=3, timeout=timedelta(seconds=5))["w"]
    tensor([1., 1.])
    >>> sender.shutdown(); joiner.shutdown()
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from torchft.checkpointing.transport import CheckpointTransport

from ..checkpoint.state import deserialize, serialize

logger = logging.getLogger(__name__)

PATH_PREFIX = "/heal/"
SOURCE_HEADER = "X-Replica-Group"


@dataclass(frozen=True)
class Received:
    """What the last :meth:`SafeHTTPTransport.recv_checkpoint` fetched.

    Attributes:
        source_replica_group: the serving peer's replica group id ("" if it sent none).
        step: the step healed to.
        bytes: size of the payload.
        seconds: time from the request to the decoded state.
    """

    source_replica_group: str
    step: int
    bytes: int
    seconds: float


class SafeHTTPTransport(CheckpointTransport[dict]):
    """Serves this replica's state to joiners, fetches a peer's when joining.

    Args:
        timeout: default for HTTP requests, and how long a request for a step
            not served yet waits for :meth:`send_checkpoint`.
        hostname: the name peers reach this process by (default: this host's name).
        port: port to listen on (0: any free one).
        replica_group: this replica group's id, sent with every payload so a
            joiner can say whom it healed from.
    """

    def __init__(self, timeout: timedelta, hostname: str | None = None, port: int = 0, replica_group: str = "") -> None:
        self._timeout = timeout
        self._hostname = hostname or socket.gethostname()
        self._replica_group = replica_group
        self._served: tuple[int, bytes] | None = None
        self._changed = threading.Condition()
        self.last_received: Received | None = None
        transport = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.connection.settimeout(transport._timeout.total_seconds())
                try:
                    step = _step_from_path(self.path)
                except ValueError as exc:
                    self.send_error(400, str(exc))
                    return
                data = transport._wait_for_step(step)
                if data is None:
                    self.send_error(404, f"step {step} is not being served")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.send_header(SOURCE_HEADER, transport._replica_group)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                logger.debug("heal server: " + format, *args)

        self._server = _QuietHTTPServer(("", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="heal-http", daemon=True)
        self._thread.start()

    def metadata(self) -> str:
        """The URL prefix joiners fetch from, ``http://<hostname>:<port>/heal/``; torchft passes it to them."""
        return f"http://{self._hostname}:{self._server.server_address[1]}{PATH_PREFIX}"

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: dict, timeout: timedelta) -> None:
        """Serve ``state_dict`` for ``step`` to joiners until the next call or :meth:`disallow_checkpoint`.

        The state is encoded at once into bytes of its own, so training may go
        on changing its tensors while joiners download. ``dst_ranks`` is only
        logged: any joiner that asks for this step gets it.
        """
        # Encoded now, into bytes of its own: training may change the tensors as
        # soon as this returns, while a joiner is still downloading.
        data = b"".join(bytes(chunk) for chunk in serialize(state_dict))
        with self._changed:
            self._served = (step, data)
            self._changed.notify_all()
        logger.info("serving step %d (%.1f MB) to replica ranks %s", step, len(data) / 1e6, dst_ranks)

    def disallow_checkpoint(self) -> None:
        """Stop serving: a request then waits up to the timeout for a :meth:`send_checkpoint` of its step, else gets 404."""
        with self._changed:
            self._served = None

    def _wait_for_step(self, step: int) -> bytes | None:
        # A joiner may ask before this side's quorum thread called send_checkpoint.
        deadline = time.monotonic() + self._timeout.total_seconds()
        with self._changed:
            while self._served is None or self._served[0] != step:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self._served[1]

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> dict:
        """Fetch and decode the state a peer serves for ``step``; ``metadata`` is the peer's :meth:`metadata`.

        Only ``http://`` URLs are fetched, the body must match its
        ``Content-Length``, and the bytes must be in the package's pickle-free
        format; anything else raises ``ValueError``. Decoded tensors are views
        of one writable buffer. Sets :attr:`last_received` (source replica
        group, step, bytes, seconds).
        """
        url = f"{metadata}{step}"
        if urlparse(url).scheme != "http":
            raise ValueError(f"heal source {url!r} is not an http:// URL; refusing to fetch it.")
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=timeout.total_seconds()) as response:
            source = response.headers.get(SOURCE_HEADER, "")
            data = _read_body(response, url)
        try:
            payload = deserialize(data)
        except ValueError as exc:
            raise ValueError(
                f"heal payload from {url} (replica rank {src_rank}) is not in elastic_hsgd's pickle-free "
                f"format ({exc}); refused: nothing from a peer is ever unpickled."
            ) from None
        self.last_received = Received(source, step, len(data), time.perf_counter() - started)
        logger.info("healed step %d from %s: %.1f MB in %.2f s", step, url, len(data) / 1e6, self.last_received.seconds)
        return payload

    def shutdown(self, wait: bool = True) -> None:
        """Stop the HTTP server and close its socket; with ``wait``, join its thread."""
        self._server.shutdown()
        self._server.server_close()
        if wait:
            self._thread.join()


def _read_body(response: Any, url: str) -> bytearray:
    """The body into one writable buffer: decoded tensors are views of it, and
    the optimizer's go on being written in place after the heal."""
    try:
        length = int(response.headers["Content-Length"])
    except (TypeError, ValueError):
        raise ValueError(f"heal reply from {url} has no valid Content-Length; refused.") from None
    data = bytearray(length)
    view = memoryview(data)
    filled = 0
    while filled < length:
        got = response.readinto(view[filled:])
        if not got:
            raise ValueError(f"heal reply from {url} ended after {filled} of {length} bytes.")
        filled += got
    return data


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A joiner that gave up (timeout, its group restarted) closes the socket
        # mid-reply; that is its business, not a traceback on stderr here.
        logger.debug("heal request from %s ended early", client_address, exc_info=True)


def _step_from_path(path: str) -> int:
    if not path.startswith(PATH_PREFIX):
        raise ValueError(f"expected {PATH_PREFIX}<step>, got {path!r}")
    try:
        return int(path[len(PATH_PREFIX):])
    except ValueError:
        raise ValueError(f"step in {path!r} is not an int") from None
