"""The heal transport's HTTP server: bounded in connections, time per connection and threads.

- The socket timeout is set at accept, before a byte of the request is read,
  so an idle connection cannot hold a thread.
- Every connection has a whole-request deadline (``timeout`` from accept): then
  its socket is shut down, however slowly the peer drips bytes in or reads them out.
- At most ``max_connections`` are handled at once; more are closed at accept.

Example::

    >>> def answer(request, deadline):
    ...     request.send_response(204)
    ...     request.end_headers()
    >>> server = HealServer(("127.0.0.1", 0), socket.AF_INET, answer, timeout_s=5.0, max_connections=4)
    >>> server.server_close()
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

#: ``answer(request, deadline)``: handle one GET; ``deadline`` is a ``time.monotonic()`` value.
Answer = Callable[[BaseHTTPRequestHandler, float], None]


class HealServer(ThreadingHTTPServer):
    """A threading HTTP server that answers ``GET`` with ``answer`` (HTTP/1.0: one request per connection)."""

    daemon_threads = True
    request_queue_size = 64  # connections beyond the slots are accepted and closed at once, not left to SYN retries

    def __init__(
        self, address: tuple, family: socket.AddressFamily, answer: Answer, timeout_s: float, max_connections: int
    ) -> None:
        self.address_family = family
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._last_busy_warning = -float("inf")
        super().__init__(address, _handler_class(answer))

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, client = super().get_request()
        sock.settimeout(self.timeout_s)  # at accept: an idle connection times out before it holds a thread long
        return sock, client

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            now = time.monotonic()
            warn = now - self._last_busy_warning > 60  # a WARNING a minute at most, not one per connection
            if warn:
                self._last_busy_warning = now
            (logger.warning if warn else logger.debug)(
                "heal server busy (%d connections): closed one from %s", self.max_connections, client_address[0]
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        watchdog = threading.Timer(self.timeout_s, _shut, (request,))
        watchdog.daemon = True
        watchdog.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            watchdog.cancel()
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A joiner that gave up (timeout, its group restarted) closes the socket
        # mid-reply; that is its business, not a traceback on stderr here.
        logger.debug("heal request from %s ended early", client_address, exc_info=True)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _handler_class(answer: Answer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            self.deadline = time.monotonic() + self.server.timeout_s  # type: ignore[attr-defined]
            super().setup()

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            answer(self, self.deadline)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
            logger.debug("heal server: " + format, *args)

    return Handler
