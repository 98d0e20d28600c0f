"""The heal transport lets in only this job's replica groups, within bounds (no torchrun).

Authentication (a shared secret: HMAC proofs on requests and replies), bounded
replies, timeouts and threads, no proxies or redirects, the advertised bind
address, one staging copy when serving, and only the current byte format.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import socket
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")

from elastic_hsgd.checkpoint import format as fileformat  # noqa: E402
from elastic_hsgd.ft import heal_auth  # noqa: E402
from elastic_hsgd.ft.env import HEAL_SECRET_ENV, HEAL_SECRET_FILE_ENV, heal_secret_from_env  # noqa: E402
from elastic_hsgd.ft.transport import SafeHTTPTransport  # noqa: E402

TIMEOUT = timedelta(seconds=5)
SECRET = b"test-heal-secret-0123456789abcdef"
LEGACY_FILE = Path(__file__).parent / "data" / "checkpoint_v0.1" / "step_000000000004" / "rank_00000.ehsgd"


@pytest.fixture(autouse=True)
def _no_secret_in_env(monkeypatch):
    monkeypatch.delenv(HEAL_SECRET_ENV, raising=False)
    monkeypatch.delenv(HEAL_SECRET_FILE_ENV, raising=False)


def _transport(**kwargs) -> SafeHTTPTransport:
    kwargs.setdefault("hostname", "127.0.0.1")
    kwargs.setdefault("secret", SECRET)
    return SafeHTTPTransport(kwargs.pop("timeout", TIMEOUT), **kwargs)


def _state() -> dict:
    return {"user": {"w": torch.arange(6.0).reshape(2, 3), "step": 4}, "torchft": {"step": 4}}


def _serve(handler_cls) -> tuple[ThreadingHTTPServer, str]:
    """A hand-written peer on 127.0.0.1; returns it and its heal URL prefix."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/heal/"


def _signed_reply(handler: BaseHTTPRequestHandler, body: bytes, secret: bytes = SECRET, group: str = "0") -> None:
    """What a peer that knows ``secret`` sends for the request ``handler`` is answering."""
    step = int(handler.path.rsplit("/", 1)[1])
    mac = heal_auth.reply_mac(secret, step, handler.headers[heal_auth.NONCE_HEADER], group, len(body))
    mac.update(body)
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body) + heal_auth.TAG_BYTES))
    handler.send_header("X-Replica-Group", group)
    handler.end_headers()
    handler.wfile.write(body + mac.digest())


def _get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- 14. authentication ------------------------------------------------------


def test_heal_secret_comes_from_the_environment_or_a_file(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=f"{HEAL_SECRET_ENV}.*{HEAL_SECRET_FILE_ENV}"):
        heal_secret_from_env()
    monkeypatch.setenv(HEAL_SECRET_ENV, SECRET.decode())
    assert heal_secret_from_env() == SECRET
    monkeypatch.delenv(HEAL_SECRET_ENV)
    path = tmp_path / "heal-secret"
    path.write_bytes(SECRET + b"\n")  # as `openssl rand -hex 32 > file` leaves it
    monkeypatch.setenv(HEAL_SECRET_FILE_ENV, str(path))
    assert heal_secret_from_env() == SECRET
    path.write_bytes(b"short\n")
    with pytest.raises(ValueError, match="at least 16"):
        heal_secret_from_env()
    path.write_bytes(b"REPLACE-ME: openssl rand -hex 32\n")
    with pytest.raises(ValueError, match="placeholder.*kubectl create secret"):
        heal_secret_from_env()
    monkeypatch.setenv(HEAL_SECRET_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(OSError, match=f"{HEAL_SECRET_FILE_ENV}=.*missing"):
        heal_secret_from_env()
    monkeypatch.setenv(HEAL_SECRET_ENV, SECRET.decode())
    with pytest.raises(ValueError, match="set only one"):
        heal_secret_from_env()


def test_transport_without_a_secret_refuses_to_start_naming_the_variable(monkeypatch):
    with pytest.raises(ValueError, match=f"set {HEAL_SECRET_ENV}, or {HEAL_SECRET_FILE_ENV}"):
        SafeHTTPTransport(TIMEOUT, hostname="127.0.0.1")
    monkeypatch.setenv(HEAL_SECRET_ENV, SECRET.decode())
    transport = SafeHTTPTransport(TIMEOUT, hostname="127.0.0.1")  # the default comes from the environment
    transport.shutdown()


def test_ft_mode_without_a_secret_refuses_to_start(monkeypatch):
    import torchft

    from elastic_hsgd.ft.replicas import ReplicaGroups
    from elastic_hsgd.ft.wiring import make_manager

    made = []
    monkeypatch.setattr(torchft, "Manager", lambda **kwargs: made.append(kwargs))
    with pytest.raises(ValueError, match=HEAL_SECRET_ENV):
        make_manager(ReplicaGroups(), {"model": torch.nn.Linear(2, 2)}, "0", lighthouse="http://127.0.0.1:9", hostname="127.0.0.1")
    assert not made  # refused before torchft's Manager (and its heartbeats) started


def test_request_without_a_valid_proof_gets_401_or_403_and_no_bytes():
    sender = _transport()
    try:
        sender.send_checkpoint([1], 3, _state(), TIMEOUT)
        port = int(sender.metadata().rsplit(":", 1)[1].split("/")[0])
        status, body = _get(port, "/heal/3")
        assert status == 401 and body == b""
        nonce = heal_auth.new_nonce()
        status, body = _get(port, "/heal/3", {heal_auth.NONCE_HEADER: nonce, heal_auth.PROOF_HEADER: "0" * 64})
        assert status == 403 and body == b""
        wrong = heal_auth.request_proof(b"another-secret-0123456789", 3, nonce)
        status, body = _get(port, "/heal/3", {heal_auth.NONCE_HEADER: nonce, heal_auth.PROOF_HEADER: wrong})
        assert status == 403 and body == b""
        # A valid request, captured: useless for another step, and used up for this one.
        good = {heal_auth.NONCE_HEADER: nonce, heal_auth.PROOF_HEADER: heal_auth.request_proof(SECRET, 3, nonce)}
        sender.send_checkpoint([1], 4, _state(), TIMEOUT)
        status, body = _get(port, "/heal/4", good)
        assert status == 403 and body == b""
        sender.send_checkpoint([1], 3, _state(), TIMEOUT)
        status, body = _get(port, "/heal/3", good)
        assert status == 200 and len(body) > heal_auth.TAG_BYTES
        status, body = _get(port, "/heal/3", good)
        assert status == 403 and body == b""
    finally:
        sender.shutdown()


def test_a_wrong_secret_on_either_side_is_a_clear_error():
    sender, joiner = _transport(), _transport(secret=b"another-secret-0123456789")
    try:
        sender.send_checkpoint([1], 3, _state(), TIMEOUT)
        with pytest.raises(PermissionError, match=f"refused this rank's proof.*same {HEAL_SECRET_ENV}"):
            joiner.recv_checkpoint(0, sender.metadata(), 3, TIMEOUT)
    finally:
        sender.shutdown()
        joiner.shutdown()


def test_reply_is_authenticated_over_the_whole_body_before_decoding(monkeypatch):
    body = b"".join(bytes(c) for c in fileformat.encode(_state()))
    replies = {
        # A stranger that answers in the joiner's place, without the secret.
        "/heal/1": lambda h: _signed_reply(h, body, secret=b"a-stranger-0123456789abcdef"),
        # The body altered in transit (one byte), the tag left as the peer computed it.
        "/heal/2": lambda h: _tampered(h, body),
        # The source group's id altered: it is inside the tag too.
        "/heal/3": lambda h: _regrouped(h, body),
        "/heal/4": lambda h: _signed_reply(h, body),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            replies[self.path](self)

        def log_message(self, *args):
            pass

    decoded = []
    real_decode = fileformat.decode
    monkeypatch.setattr(fileformat, "decode", lambda buf: decoded.append(1) or real_decode(buf))
    server, base = _serve(Handler)
    joiner = _transport()
    try:
        for step in (1, 2, 3):
            with pytest.raises(ValueError, match="failed its HMAC-SHA256 check.*refused before decoding"):
                joiner.recv_checkpoint(0, base, step, TIMEOUT)
        assert decoded == []
        payload = joiner.recv_checkpoint(0, base, 4, TIMEOUT)
        assert torch.equal(payload["user"]["w"], _state()["user"]["w"]) and decoded == [1]
    finally:
        server.shutdown()
        joiner.shutdown()


def _tampered(handler, body):
    step = int(handler.path.rsplit("/", 1)[1])
    mac = heal_auth.reply_mac(SECRET, step, handler.headers[heal_auth.NONCE_HEADER], "0", len(body))
    mac.update(body)
    changed = bytearray(body)
    changed[-1] ^= 1
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body) + heal_auth.TAG_BYTES))
    handler.send_header("X-Replica-Group", "0")
    handler.end_headers()
    handler.wfile.write(bytes(changed) + mac.digest())


def _regrouped(handler, body):
    step = int(handler.path.rsplit("/", 1)[1])
    mac = heal_auth.reply_mac(SECRET, step, handler.headers[heal_auth.NONCE_HEADER], "0", len(body))
    mac.update(body)
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body) + heal_auth.TAG_BYTES))
    handler.send_header("X-Replica-Group", "5")
    handler.end_headers()
    handler.wfile.write(body + mac.digest())


# -- 15. bounded -------------------------------------------------------------


def test_reply_announcing_more_than_max_bytes_is_refused_before_allocating():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(10**15))  # a petabyte: allocating it would fail
            self.end_headers()

        def log_message(self, *args):
            pass

    server, base = _serve(Handler)
    joiner = _transport(max_bytes=1 << 20)
    try:
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"announces 999999999999968 bytes, more than max_bytes=1048576; refused before reading"):
            joiner.recv_checkpoint(0, base, 3, TIMEOUT)
        assert time.monotonic() - started < 3
    finally:
        server.shutdown()
        joiner.shutdown()


def test_make_manager_bounds_heals_by_this_ranks_own_state(monkeypatch):
    import torchft

    from elastic_hsgd.ft.replicas import ReplicaGroups
    from elastic_hsgd.ft.wiring import heal_bytes_limit, make_manager

    model = torch.nn.Linear(100, 100)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    own = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    limit = heal_bytes_limit(state)
    assert 2 * own < limit < 100 * own + (128 << 20)
    made = []

    class FakeManager:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def register_state_dict_fn(self, *args):
            pass

    monkeypatch.setattr(torchft, "Manager", FakeManager)
    monkeypatch.setenv(HEAL_SECRET_ENV, SECRET.decode())
    top = ReplicaGroups()
    make_manager(top, state, "0", lighthouse="http://127.0.0.1:9", hostname="127.0.0.1")
    try:
        assert made[0]["checkpoint_transport"] is top.transport and top.transport.max_bytes == limit
    finally:
        top.transport.shutdown()


def test_idle_connections_are_dropped_and_do_not_pin_threads():
    sender = _transport(timeout=timedelta(seconds=1))
    joiner = _transport()
    port = int(sender.metadata().rsplit(":", 1)[1].split("/")[0])
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        time.sleep(0.5)
        assert threading.active_count() - before <= 20, threading.active_count() - before
        # Past the timeout every idle connection is closed by the server: poll for it with a deadline.
        deadline = time.monotonic() + 15
        while threading.active_count() - before > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        for sock in idle:
            sock.settimeout(2)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        assert threading.active_count() - before <= 2
        # And heals are served again.
        sender.send_checkpoint([1], 3, _state(), TIMEOUT)
        assert joiner.recv_checkpoint(0, sender.metadata(), 3, TIMEOUT)["user"]["step"] == 4
    finally:
        for sock in idle:
            sock.close()
        sender.shutdown()
        joiner.shutdown()


def test_a_slow_dripping_peer_cannot_stall_a_heal():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):  # one byte every 0.2 s: each read is quick, the whole takes 200 s
                    self.wfile.write(b"x")
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server, base = _serve(Handler)
    joiner = _transport()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish within 1.5 s"):
            joiner.recv_checkpoint(0, base, 3, timedelta(seconds=1.5))
        assert time.monotonic() - started < 4
    finally:
        server.shutdown()
        joiner.shutdown()


def test_a_slow_dripping_client_cannot_hold_the_server():
    sender = _transport(timeout=timedelta(seconds=1))
    port = int(sender.metadata().rsplit(":", 1)[1].split("/")[0])
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        started = time.monotonic()
        sock.settimeout(5)
        closed = False
        for ch in b"GET /heal/3 HTTP/1.0\r\nX-Padding: " + b"a" * 100:
            try:
                sock.send(bytes([ch]))
                time.sleep(0.1)  # far below the per-read timeout, forever in total
            except OSError:
                closed = True
                break
            if time.monotonic() - started > 4:
                break
        if not closed:
            try:
                closed = sock.recv(1) == b""
            except OSError:
                closed = True
        assert closed and time.monotonic() - started < 4
    finally:
        sock.close()
        sender.shutdown()


def test_proxies_and_redirects_are_not_followed(monkeypatch):
    proxied = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self):
            proxied.append(self.path)
            _signed_reply(self, b"".join(bytes(c) for c in fileformat.encode({"user": {"w": torch.zeros(1)}})))

        def log_message(self, *args):
            pass

    proxy, proxy_base = _serve(Proxy)
    monkeypatch.setenv("http_proxy", proxy_base.removesuffix("/heal/"))
    monkeypatch.setenv("HTTP_PROXY", proxy_base.removesuffix("/heal/"))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", proxy_base + "9")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    redirect, redirect_base = _serve(Redirect)
    sender, joiner = _transport(), _transport()
    try:
        sender.send_checkpoint([1], 3, _state(), TIMEOUT)
        assert torch.equal(joiner.recv_checkpoint(0, sender.metadata(), 3, TIMEOUT)["user"]["w"], _state()["user"]["w"])
        with pytest.raises(OSError, match="HTTP 302.*not followed"):
            joiner.recv_checkpoint(0, redirect_base, 3, TIMEOUT)
        assert proxied == []
    finally:
        for s in (proxy, redirect):
            s.shutdown()
        sender.shutdown()
        joiner.shutdown()


def test_binds_the_advertised_address_and_brackets_ipv6():
    sender = _transport()
    try:
        assert sender._server.server_address[0] == "127.0.0.1"
        assert sender.metadata().startswith("http://127.0.0.1:")
    finally:
        sender.shutdown()
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    sender, joiner = _transport(hostname="::1"), _transport(hostname="::1")
    try:
        assert sender.metadata().startswith("http://[::1]:") and sender._server.server_address[0] == "::1"
        sender.send_checkpoint([1], 3, _state(), TIMEOUT)
        assert joiner.recv_checkpoint(0, sender.metadata(), 3, TIMEOUT)["user"]["step"] == 4
    finally:
        sender.shutdown()
        joiner.shutdown()


# -- 16. serving costs one staging copy --------------------------------------

STATE_MB = 100


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _memory_server(to_parent, from_parent) -> None:
    """A sender in a process of its own: how much its peak memory grows serving one heal."""
    torch.set_num_threads(1)
    state = {"user": {"w": torch.full((STATE_MB * (1 << 20) // 4,), 1.5)}, "torchft": {"step": 1}}
    state["user"]["w"][::4096] = 2.5
    sender = SafeHTTPTransport(timedelta(seconds=60), hostname="127.0.0.1", secret=SECRET)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS where allowed
    except OSError:
        pass
    before = _peak_kib()  # the state was built without temporaries: about the RSS now
    sender.send_checkpoint([1], 1, state, timedelta(seconds=60))
    to_parent.put(sender.metadata())
    from_parent.get(timeout=120)  # the parent has downloaded it
    to_parent.put({"growth_kib": _peak_kib() - before, "rss_kib": _rss_kib()})
    sender.shutdown()


def test_serving_a_heal_costs_one_staging_copy_not_two():
    ctx = mp.get_context("spawn")
    to_parent, from_parent = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_memory_server, args=(to_parent, from_parent), daemon=True)
    proc.start()
    joiner = _transport(timeout=timedelta(seconds=60))
    try:
        metadata = to_parent.get(timeout=120)
        payload = joiner.recv_checkpoint(0, metadata, 1, timedelta(seconds=60))
        w = payload["user"]["w"]
        assert w.numel() * 4 == STATE_MB << 20 and w[0].item() == 2.5 and w[1].item() == 1.5
        del payload, w
        from_parent.put("done")
        growth_mib = to_parent.get(timeout=120)["growth_kib"] / 1024
    finally:
        joiner.shutdown()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    # One staging copy (training may change the originals while a joiner downloads); the encoded
    # chunks are views of it. Joining them into one bytes object cost a second copy.
    assert growth_mib < 1.4 * STATE_MB, f"serving a {STATE_MB} MB state grew peak memory by {growth_mib:.0f} MiB"


# -- 17. only the current format from a peer ---------------------------------


def test_heals_refuse_the_legacy_format():
    legacy = LEGACY_FILE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            _signed_reply(self, legacy)  # an authenticated peer running elastic_hsgd 0.1

        def log_message(self, *args):
            pass

    server, base = _serve(Handler)
    joiner = _transport()
    try:
        with pytest.raises(ValueError, match=r"0\.1's \.ehsgd format; heals accept only the current format"):
            joiner.recv_checkpoint(0, base, 4, TIMEOUT)
    finally:
        server.shutdown()
        joiner.shutdown()


def test_a_refused_request_is_logged_on_the_server(caplog):
    sender = _transport()
    try:
        port = int(sender.metadata().rsplit(":", 1)[1].split("/")[0])
        with caplog.at_level("WARNING", logger="elastic_hsgd.ft.transport"):
            _get(port, "/heal/3")
            deadline = time.monotonic() + 5
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.05)
        assert any(HEAL_SECRET_ENV in r.getMessage() and "refused" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        sender.shutdown()



def test_a_heal_refused_for_its_secret_stops_joining_instead_of_retrying_forever():
    from torchft.manager import ExceptionWithTraceback

    from elastic_hsgd.ft.heal_client import ProofRefused
    from elastic_hsgd.ft.replicas import ReplicaGroups
    from elastic_hsgd.ft.wiring import sync_until_committed

    class Manager:
        def __init__(self, error):
            self.error = error

        def errored(self):
            return self.error

    class Averager:
        def __init__(self, outcomes):
            self.outcomes = outcomes

        def sync_top_level(self, params):
            return self.outcomes.pop(0)

    top = ReplicaGroups()
    top.manager = Manager(ExceptionWithTraceback(ConnectionResetError("peer restarted")))
    assert sync_until_committed(Averager([False, False, True]), [], top) is None  # transient: tried again
    top.manager = Manager(ExceptionWithTraceback(ProofRefused("refused this rank's proof (HTTP 403)")))
    averager = Averager([False, True])
    with pytest.raises(ProofRefused, match="HTTP 403"):
        sync_until_committed(averager, [], top)
    assert averager.outcomes == [True]  # no second try
