"""A pickle-free, authenticated :class:`torchft.checkpointing.CheckpointTransport` over HTTP.

torchft's bundled transports run code from the wire (``HTTPTransport`` loads
with ``torch.load(weights_only=False)``, ``PGTransport`` unpickles metadata), so
any peer, or anyone who can reach the port, could run code in a joining group.
This one carries the checkpoint byte format of :mod:`elastic_hsgd.checkpoint`
(a JSON tree plus raw tensor bytes): decoding never imports or calls anything,
and bytes in any other format are refused with ``ValueError``.

Only this job's replica groups get in: every request and every reply carries
an HMAC-SHA256 proof made with the secret all groups share (``secret``, by
default ``ELASTIC_HSGD_HEAL_SECRET`` or the file ``ELASTIC_HSGD_HEAL_SECRET_FILE``
names; see :mod:`.heal_auth`). And it is bounded: replies over ``max_bytes`` are
refused before anything is allocated, every request has a deadline on both
sides, idle or slow connections are dropped, at most
:data:`MAX_CONNECTIONS` are served at once, and proxies and redirects are never
followed.

Example::

    >>> from datetime import timedelta
    >>> import torch
    >>> secret = b"0123456789abcdef0123456789abcdef"   # in a job: ELASTIC_HSGD_HEAL_SECRET
    >>> sender = SafeHTTPTransport(timedelta(seconds=5), hostname="127.0.0.1", secret=secret)
    >>> joiner = SafeHTTPTransport(timedelta(seconds=5), hostname="127.0.0.1", secret=secret, max_bytes=1 << 20)
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
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torchft.checkpointing.transport import CheckpointTransport

from ..checkpoint import format as fileformat
from ..checkpoint.state import copy_to_cpu
from ..checkpoint.tensorfile import MAGIC as LEGACY_MAGIC
from . import heal_auth
from .env import HEAL_SECRET_ENV, HEAL_SECRET_FILE_ENV, HOSTNAME_ENV, check_heal_secret, heal_secret_from_env
from .heal_client import PIECE, SOURCE_HEADER, HealRefused, fetch
from .heal_server import HealServer

logger = logging.getLogger(__name__)

PATH_PREFIX = "/heal/"
#: Connections served at once; more are closed at accept (joiners are one per rank of a joining group).
MAX_CONNECTIONS = 8


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


@dataclass(frozen=True)
class _Served:
    step: int
    chunks: list  # the encoded file: a header, then views of ``staged``'s tensors
    nbytes: int
    staged: Any  # keeps the staging copy alive while chunks point into it


class SafeHTTPTransport(CheckpointTransport[dict]):
    """Serves this replica's state to joiners, fetches a peer's when joining.

    Args:
        timeout: default for HTTP requests, how long a request for a step not
            served yet waits for :meth:`send_checkpoint`, and the server's
            deadline for one whole request.
        hostname: the name or address peers reach this process by (default:
            this host's name); the server binds the address it resolves to.
        port: port to listen on (0: any free one).
        replica_group: this replica group's id, sent (authenticated) with every
            payload so a joiner can say whom it healed from.
        secret: the secret every replica group of the job shares (at least 16
            bytes); default from ``ELASTIC_HSGD_HEAL_SECRET`` or the file named
            by ``ELASTIC_HSGD_HEAL_SECRET_FILE``. Without one it raises ``ValueError``.
        max_bytes: the largest payload :meth:`recv_checkpoint` accepts; a reply
            announcing more is refused before anything is allocated. ``None``:
            no bound (:func:`~.wiring.make_manager` always sets one).
    """

    def __init__(
        self,
        timeout: timedelta,
        hostname: str | None = None,
        port: int = 0,
        replica_group: str = "",
        *,
        secret: bytes | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._secret = heal_secret_from_env() if secret is None else check_heal_secret(secret, "SafeHTTPTransport(secret=...)")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes={max_bytes!r} must be a non-negative int (or None for no bound).")
        self.max_bytes = max_bytes
        self._timeout = timeout
        self._hostname = hostname or socket.gethostname()
        self._replica_group = replica_group
        self._served: _Served | None = None
        self._changed = threading.Condition()
        self._nonces = heal_auth.SeenNonces()
        self._warned: set[str] = set()
        self.last_received: Received | None = None
        family, address = _bind_address(self._hostname, port)
        self._server = HealServer(address, family, self._handle, timeout.total_seconds(), MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self._server.serve_forever, name="heal-http", daemon=True)
        self._thread.start()

    def metadata(self) -> str:
        """The URL prefix joiners fetch from, ``http://<hostname>:<port>/heal/``; torchft passes it to them."""
        host = f"[{self._hostname}]" if ":" in self._hostname and not self._hostname.startswith("[") else self._hostname
        return f"http://{host}:{self._server.server_address[1]}{PATH_PREFIX}"

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: dict, timeout: timedelta) -> None:
        """Serve ``state_dict`` for ``step`` to joiners until the next call or :meth:`disallow_checkpoint`.

        The state is copied at once into one staging copy in host memory, so
        training may go on changing its tensors while joiners download; the
        reply streams the encoded file from views of that copy (no second
        one). ``dst_ranks`` is only logged: any joiner with the secret that
        asks for this step gets it.
        """
        staged = copy_to_cpu(state_dict)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the non_blocking copies must land before serving
        chunks = fileformat.encode(staged)
        served = _Served(step, chunks, sum(memoryview(c).nbytes for c in chunks), staged)
        with self._changed:
            self._served = served
            self._changed.notify_all()
        logger.info("serving step %d (%.1f MB) to replica ranks %s", step, served.nbytes / 1e6, dst_ranks)

    def disallow_checkpoint(self) -> None:
        """Stop serving: a request then waits up to the timeout for a :meth:`send_checkpoint` of its step, else gets 404."""
        with self._changed:
            self._served = None

    def _wait_for_step(self, step: int, deadline: float) -> _Served | None:
        # A joiner may ask before this side's quorum thread called send_checkpoint.
        with self._changed:
            while self._served is None or self._served.step != step:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self._served

    def _handle(self, request: Any, deadline: float) -> None:
        """Answer one ``GET`` (``request`` is the http.server handler) by :meth:`HealServer`'s deadline."""
        try:
            step = _step_from_path(request.path)
        except ValueError as exc:
            return _refuse(request, 400, str(exc))
        nonce, proof = request.headers.get(heal_auth.NONCE_HEADER), request.headers.get(heal_auth.PROOF_HEADER)
        if not nonce or not proof:
            self._warn_refused(request, step, "no proof")
            return _refuse(request, 401, "heal request without a proof")
        with self._changed:
            valid = heal_auth.check_request(self._secret, step, nonce, proof) and self._nonces.first_use(nonce)
        if not valid:
            self._warn_refused(request, step, "a wrong or reused proof")
            return _refuse(request, 403, "wrong or reused heal proof")
        served = self._wait_for_step(step, deadline)
        if served is None:
            return _refuse(request, 404, f"step {step} is not being served")
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(served.nbytes + heal_auth.TAG_BYTES))
        request.send_header(SOURCE_HEADER, self._replica_group)
        request.end_headers()
        mac = heal_auth.reply_mac(self._secret, step, nonce, self._replica_group, served.nbytes)
        for chunk in served.chunks:
            view = memoryview(chunk).cast("B")
            for start in range(0, view.nbytes, PIECE):
                piece = view[start : start + PIECE]
                mac.update(piece)
                request.wfile.write(piece)
        request.wfile.write(mac.digest())

    def _warn_refused(self, request: Any, step: int, what: str) -> None:
        host = str(request.client_address[0])
        first = host not in self._warned
        if len(self._warned) < 1024:  # a WARNING per host, once; then DEBUG
            self._warned.add(host)
        (logger.warning if first else logger.debug)(
            "refused a heal request for step %d from %s: %s. It is not one of this job's replica groups, or it "
            "has another %s / %s than this group.", step, host, what, HEAL_SECRET_ENV, HEAL_SECRET_FILE_ENV,
        )

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> dict:
        """Fetch and decode the state a peer serves for ``step``; ``metadata`` is the peer's :meth:`metadata`.

        Only ``http://`` URLs are fetched, directly (no proxy, no redirect),
        within ``timeout`` for the whole request. The reply must be at most
        :attr:`max_bytes`, match its ``Content-Length``, pass its HMAC check
        over the whole body (``ValueError`` otherwise, before decoding), and be
        in the package's current pickle-free format (``ValueError``). A peer
        that refuses this rank's proof raises ``PermissionError``, one that
        does not serve the step another ``OSError``, a deadline missed
        ``TimeoutError``. Decoded tensors are views of one writable buffer.
        Sets :attr:`last_received` (source replica group, step, bytes, seconds).
        """
        url = f"{metadata}{step}"
        started = time.perf_counter()
        seconds = timeout.total_seconds()
        source, data = fetch(url, step, self._secret, max_bytes=self.max_bytes, seconds=seconds, src_rank=src_rank)
        payload = _decode(data, url, src_rank)
        self.last_received = Received(source, step, len(data), time.perf_counter() - started)
        logger.info("healed step %d from %s: %.1f MB in %.2f s", step, url, len(data) / 1e6, self.last_received.seconds)
        return payload

    def shutdown(self, wait: bool = True) -> None:
        """Stop the HTTP server and close its socket; with ``wait``, join its thread."""
        self._server.shutdown()
        self._server.server_close()
        if wait:
            self._thread.join()


def _refuse(request: Any, status: int, reason: str) -> None:
    """An error status with no body (the reason in the status line), then close."""
    request.send_response(status, reason)
    request.send_header("Content-Length", "0")
    request.end_headers()


def _decode(data: bytearray, url: str, src_rank: int) -> dict:
    if bytes(data[: len(LEGACY_MAGIC)]) == LEGACY_MAGIC:
        raise HealRefused(
            f"heal payload from {url} is in elastic_hsgd 0.1's .ehsgd format; heals accept only the current format "
            "(safetensors with the tree as JSON): run the same elastic_hsgd version in every replica group."
        )
    try:
        payload = fileformat.decode(data)
    except ValueError as exc:
        raise HealRefused(
            f"heal payload from {url} (replica rank {src_rank}) is not in elastic_hsgd's pickle-free "
            f"format ({exc}); refused: nothing from a peer is ever unpickled."
        ) from None
    if not isinstance(payload, dict):
        raise HealRefused(f"heal payload from {url} is a {type(payload).__name__}, not a dict; refused.")
    return payload


def _bind_address(hostname: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    """The address ``hostname`` resolves to (the first one), to listen on: peers reach this process there."""
    host = hostname[1:-1] if hostname.startswith("[") and hostname.endswith("]") else hostname
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, IndexError) as exc:
        raise ValueError(
            f"heal hostname {hostname!r} does not resolve ({exc}): set {HOSTNAME_ENV} to this host's address "
            "that other replica groups reach it by (deploy/ft uses the pod IP)."
        ) from None
    return family, address


def _step_from_path(path: str) -> int:
    if not path.startswith(PATH_PREFIX) or not path[len(PATH_PREFIX):].isdigit():
        raise ValueError(f"expected {PATH_PREFIX}<step>, got {path[:100]!r}")
    return int(path[len(PATH_PREFIX):])
