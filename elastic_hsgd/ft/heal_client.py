"""The joiner's side of a heal: one authenticated, bounded ``GET`` of a peer's payload.

:func:`fetch` talks ``http.client`` directly: it never reads ``http_proxy`` and
never follows a redirect. The whole request has one deadline (at which the
socket is shut down, however slowly the peer drips), a reply over
``max_bytes`` is refused before anything is allocated, and the body is checked
against its HMAC tag (:mod:`.heal_auth`) before anyone decodes a byte of it.

Example::

    >>> # xdoctest: +SKIP("needs a peer serving step 3")
    >>> source, body = fetch("http://10.0.0.7:41234/heal/3", 3, secret, max_bytes=1 << 30, seconds=10.0)
"""

from __future__ import annotations

import hmac
import http.client
import socket
import threading
import time
from typing import Any
from urllib.parse import urlparse

from . import heal_auth
from .env import HEAL_SECRET_ENV, HEAL_SECRET_FILE_ENV

SOURCE_HEADER = "X-Replica-Group"
PIECE = 4 << 20  # bytes read per socket call, so the deadline is checked between them
_SAME_SECRET = f"give every replica group the same {HEAL_SECRET_ENV} (or {HEAL_SECRET_FILE_ENV})"


class HealRefused(ValueError):
    """A peer's reply this rank will not load: it failed its HMAC check, is over ``max_bytes``, or is not
    in the current format. Retrying cannot fix it (:func:`~.wiring.sync_until_committed` stops)."""


class ProofRefused(PermissionError):
    """The peer refused this rank's proof (HTTP 401/403): the groups do not share one heal secret."""


def fetch(
    url: str, step: int, secret: bytes, *, max_bytes: int | None, seconds: float, src_rank: int = 0
) -> tuple[str, bytearray]:
    """The source group's id and the authenticated body a peer serves for ``step`` at ``url``.

    Only ``http://host[:port]/...`` URLs are fetched (else ``ValueError``).
    Raises :class:`ProofRefused` (a ``PermissionError``) if the peer refuses this rank's proof,
    ``FileNotFoundError`` if it does not serve ``step``, ``ConnectionError`` for
    a redirect, another status or a short reply, ``TimeoutError`` past
    ``seconds``, and :class:`HealRefused` (a ``ValueError``) for a reply over
    ``max_bytes`` or one that fails its HMAC check.
    """
    parsed = urlparse(url)
    if parsed.scheme != "http" or not parsed.hostname:
        raise ValueError(f"heal source {url!r} is not an http://host:port/ URL; refusing to fetch it.")
    nonce = heal_auth.new_nonce()
    headers = {heal_auth.NONCE_HEADER: nonce, heal_auth.PROOF_HEADER: heal_auth.request_proof(secret, step, nonce)}
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=seconds)
    try:
        with _Deadline(conn, seconds) as deadline:
            try:
                conn.request("GET", parsed.path, headers=headers)
                response = conn.getresponse()
                source = response.headers.get(SOURCE_HEADER, "")
                length = _check_reply(response, url, step, max_bytes)
                mac = heal_auth.reply_mac(secret, step, nonce, source, length)
                data = _read_body(response, url, length, mac, deadline)
                tag = response.read(heal_auth.TAG_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                if deadline.expired():
                    raise TimeoutError(f"heal from {url} did not finish within {seconds:g} s ({exc!r}).") from None
                if isinstance(exc, OSError):
                    raise
                raise ConnectionError(f"heal reply from {url} is not valid HTTP: {exc!r}") from None
    finally:
        conn.close()
    if len(tag) != heal_auth.TAG_BYTES or not hmac.compare_digest(tag, mac.digest()):
        raise HealRefused(
            f"heal reply from {url} (replica rank {src_rank}) failed its HMAC-SHA256 check: it was altered on "
            f"the way, or comes from a process without this job's heal secret; refused before decoding. If every "
            f"group is yours, {_SAME_SECRET}."
        )
    return source, data


def _check_reply(response: http.client.HTTPResponse, url: str, step: int, max_bytes: int | None) -> int:
    """The body's length (without the tag), once the status and ``Content-Length`` are acceptable."""
    status = response.status
    if status in (401, 403):
        raise ProofRefused(f"heal source {url} refused this rank's proof (HTTP {status} {response.reason}): {_SAME_SECRET}.")
    if 300 <= status < 400:
        where = response.headers.get("Location")
        raise ConnectionError(f"heal source {url} answered HTTP {status} (a redirect to {where!r}); redirects are not followed.")
    if status == 404:
        raise FileNotFoundError(f"heal source {url} does not serve step {step} (HTTP 404 {response.reason}).")
    if status != 200:
        raise ConnectionError(f"heal source {url} answered HTTP {status} {response.reason}.")
    announced = response.headers.get("Content-Length", "")
    if not announced.isdigit() or int(announced) < heal_auth.TAG_BYTES:
        raise HealRefused(f"heal reply from {url} has no valid Content-Length ({announced!r}); refused.")
    length = int(announced) - heal_auth.TAG_BYTES
    if max_bytes is not None and length > max_bytes:
        raise HealRefused(
            f"heal reply from {url} announces {length} bytes, more than max_bytes={max_bytes}; refused before "
            "reading. If the peer's state is really that large, raise the bound (make_manager(max_heal_bytes=...))."
        )
    return length


def _read_body(response: http.client.HTTPResponse, url: str, length: int, mac: Any, deadline: _Deadline) -> bytearray:
    """The body into one writable buffer (decoded tensors are views of it, and the optimizer's go on
    being written in place after the heal), fed to ``mac`` as it arrives."""
    data = bytearray(length)
    view = memoryview(data)
    filled = 0
    while filled < length:
        deadline.check()
        got = response.readinto(view[filled : filled + PIECE])
        if not got:
            raise ConnectionError(f"heal reply from {url} ended after {filled} of {length} bytes.")
        mac.update(view[filled : filled + got])
        filled += got
    return data


class _Deadline:
    """A whole-request deadline for an HTTP connection: at ``seconds`` its socket is shut down, which
    ends any read or write blocked on it (however slowly the peer drips), and :meth:`check` raises."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float) -> None:
        self._conn, self._seconds = conn, seconds
        self._end = time.monotonic() + seconds
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._sock: socket.socket | None = None

    def __enter__(self) -> _Deadline:
        self._conn.connect()
        self._sock = self._conn.sock  # kept: http.client drops it once the response owns the connection
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        try:
            if self._sock is not None:
                self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def check(self) -> None:
        if self.expired():
            raise TimeoutError(f"heal deadline of {self._seconds:g} s passed")
