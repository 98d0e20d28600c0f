"""The replicas level's pure checks and the pickle-free heal transport (no torchrun)."""

from __future__ import annotations

import os
import pickle
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from elastic_hsgd.hierarchy import check_replicas_level, normalize_config, resolve_levels

pytest.importorskip("torchft")

from elastic_hsgd.ft.transport import SafeHTTPTransport  # noqa: E402

TIMEOUT = timedelta(seconds=5)


def test_replicas_must_be_the_top_level_in_fault_tolerant_mode():
    check_replicas_level(normalize_config({2: "local", 8: "world", 32: "replicas"}), fault_tolerant=True)
    with pytest.raises(ValueError, match=r"top level .* is 'world' .* make the last level 'replicas'"):
        check_replicas_level(normalize_config({2: "local", 8: "world"}), fault_tolerant=True)
    with pytest.raises(ValueError, match="'replicas' for period 8 is not the last level"):
        check_replicas_level(normalize_config({8: "replicas", 16: "world"}), fault_tolerant=True)
    with pytest.raises(ValueError, match="needs the fault-tolerant mode"):
        check_replicas_level(normalize_config({2: 2, 8: "replicas"}), fault_tolerant=False)


def test_replicas_spans_the_whole_replica_group():
    levels = resolve_levels(normalize_config({2: "local", 8: "replicas"}), world_size=4, local_world_size=2)
    assert [(lv.period, lv.group_size) for lv in levels] == [(2, 2), (8, 4)]


def test_averager_rejects_replicas_without_a_top_level():
    from elastic_hsgd import HierarchicalModelAverager

    with pytest.raises(ValueError, match="needs the fault-tolerant mode"):
        HierarchicalModelAverager({2: 2, 8: "replicas"})


def test_heal_payload_round_trips_a_training_state():
    sender, joiner = SafeHTTPTransport(TIMEOUT, replica_group="2"), SafeHTTPTransport(TIMEOUT)
    try:
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        state = {"user": {"s": {"model": model.state_dict(), "optimizer": opt.state_dict(), "averager": {"step": 7}}}, "torchft": {"step": 3}}
        # The joiner asks before the sender serves: the request waits for it.
        result: dict = {}
        fetch = threading.Thread(target=lambda: result.update(p=joiner.recv_checkpoint(0, sender.metadata(), 3, TIMEOUT)))
        fetch.start()
        sender.send_checkpoint([1], 3, state, TIMEOUT)
        fetch.join(10)
        payload = result["p"]
        assert torch.equal(payload["user"]["s"]["model"]["weight"], model.weight.detach())
        momentum = payload["user"]["s"]["optimizer"]["state"][0]["momentum_buffer"]
        assert momentum.shape == (2, 3)
        momentum.add_(1.0)  # writable: the optimizer keeps stepping these in place after a heal
        assert payload["user"]["s"]["averager"] == {"step": 7} and payload["torchft"] == {"step": 3}
        assert joiner.last_received.source_replica_group == "2" and joiner.last_received.bytes > 0
        sender.disallow_checkpoint()
        with pytest.raises(OSError):  # nothing served: the request fails (404 or timeout), never stale state
            joiner.recv_checkpoint(0, sender.metadata(), 3, timedelta(seconds=0.5))
    finally:
        sender.shutdown()
        joiner.shutdown()


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_heal_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"user": _Exploit(str(marker))})
    torch_evil = tmp_path / "evil.pt"
    torch.save({"user": _Exploit(str(marker))}, torch_evil)
    bodies = {"/heal/5": evil, "/heal/6": torch_evil.read_bytes()}
    assert not marker.exists()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    joiner = SafeHTTPTransport(TIMEOUT)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/heal/"
        for step in (5, 6):
            with pytest.raises(ValueError, match="not in elastic_hsgd's pickle-free format.*refused"):
                joiner.recv_checkpoint(0, base, step, TIMEOUT)
        # Sanity: the same bytes do run code when unpickled, so the refusal is what saved us.
        pickle.loads(evil)
        assert marker.exists()
        os.remove(marker)
    finally:
        server.shutdown()
        joiner.shutdown()


def test_replica_group_id_must_be_a_non_negative_int():
    from elastic_hsgd.ft.env import check_replica_group_id

    assert check_replica_group_id("007") == "7"
    for bad in (None, "", "a", "-1", "1.5"):
        with pytest.raises(ValueError, match="--replica-group-id N or set REPLICA_GROUP_ID=N"):
            check_replica_group_id(bad)
