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

from elastic_hsgd.ft import heal_auth  # noqa: E402
from elastic_hsgd.ft.env import HEAL_SECRET_ENV  # noqa: E402
from elastic_hsgd.ft.transport import SafeHTTPTransport  # noqa: E402

TIMEOUT = timedelta(seconds=5)
SECRET = "test-ft-heal-secret-0123456789"


@pytest.fixture(autouse=True)
def _heal_secret(monkeypatch):
    """Every transport here shares one heal secret (fault-tolerant mode requires one)."""
    monkeypatch.setenv(HEAL_SECRET_ENV, SECRET)


def _write_signed(handler: BaseHTTPRequestHandler, body: bytes) -> None:
    """Reply as a peer holding the job's heal secret would: the body, then its HMAC tag."""
    step = int(handler.path.rsplit("/", 1)[1])
    mac = heal_auth.reply_mac(SECRET.encode(), step, handler.headers[heal_auth.NONCE_HEADER], "", len(body))
    mac.update(body)
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body) + heal_auth.TAG_BYTES))
    handler.end_headers()
    handler.wfile.write(body + mac.digest())


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
            # A peer that holds the secret (or a compromised group): the decoder is the last line.
            _write_signed(self, bodies[self.path])

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


# -- each replica group draws its own random numbers ---------------------------------


def _rng_group(group: int, lighthouse: str, seed: int, results, ready) -> None:
    """One replica group of one process: group 0 trains and serves, group 1 joins later and heals."""
    import random
    import time

    import torch.distributed as dist

    from elastic_hsgd import HierarchicalModelAverager
    from elastic_hsgd.ft.replicas import ReplicaGroups
    from elastic_hsgd.ft.wiring import join, make_manager, sync_until_committed
    from tests.distributed import free_port

    try:
        port = free_port()
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
            **{HEAL_SECRET_ENV: SECRET},
        )
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        torch.manual_seed(0)  # both groups build the same model, and start from the same RNG state
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        top = ReplicaGroups()
        averager = HierarchicalModelAverager({1: "replicas"}, warmup_steps=0, top_level=top)
        state = {"model": model, "optimizer": opt, "averager": averager}
        x, y = torch.linspace(-1, 1, 32).reshape(8, 4), torch.arange(8) % 2  # no RNG in training

        def train_step() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            averager.average_parameters(model.parameters())

        make_manager(top, state, str(group), lighthouse=lighthouse, timeout=timedelta(seconds=20), hostname="127.0.0.1", seed=seed)
        joined = join(averager, model.parameters(), top)
        if group == 0:
            for _ in range(3):
                train_step()
            ready.put("ready")
            deadline = time.monotonic() + 120
            # Train until group 1 takes part: it healed in the sync before.
            while not any(e["replicas"] == 2 for e in top.take_events()):
                assert time.monotonic() < deadline, "group 1 never took part"
                train_step()
                time.sleep(0.02)
            heal_step = None
        else:
            assert joined.heal is not None and joined.heal.source_replica == "0", joined
            heal_step = joined.step
            sync_until_committed(averager, model.parameters(), top)  # the sync group 0 sees two groups in
        drawn = {"torch": torch.rand(4).tolist(), "python": random.random()}
        top.manager.shutdown(wait=False)
        dist.destroy_process_group()
        results.put((group, "ok", {"drawn": drawn, "heal_step": heal_step}))
    except BaseException:  # noqa: BLE001 - reported to the test
        import traceback

        results.put((group, "error", traceback.format_exc()))


def test_a_healed_group_draws_its_own_reproducible_random_numbers():
    import multiprocessing as mp

    from bench.torchft_peer import start_lighthouse
    from elastic_hsgd.ft.reseed import replica_rank_seed

    lighthouse = start_lighthouse(min_replicas=1)
    ctx = mp.get_context("spawn")
    results, ready = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_rng_group, args=(0, lighthouse.address(), 5, results, ready), daemon=True)]
    out = {}
    try:
        procs[0].start()
        ready.get(timeout=120)
        procs.append(ctx.Process(target=_rng_group, args=(1, lighthouse.address(), 5, results, ready), daemon=True))
        procs[1].start()
        for _ in range(2):
            group, status, value = results.get(timeout=180)
            assert status == "ok", value
            out[group] = value
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        lighthouse.shutdown()
    # Before: group 1 took group 0's RNG state with the heal, so both drew the same numbers.
    assert out[0]["drawn"] != out[1]["drawn"], out
    # After a heal a rank draws from replica_rank_seed(seed, healed step, group, rank).
    expected = torch.Generator().manual_seed(replica_rank_seed(5, out[1]["heal_step"], "1", 0))
    assert out[1]["drawn"]["torch"] == torch.rand(4, generator=expected).tolist()


def test_groups_resuming_from_the_one_writers_files_draw_their_own_numbers(single_process_group, tmp_path):
    from elastic_hsgd import CheckpointManager, HierarchicalModelAverager
    from elastic_hsgd.elastic import resume
    from elastic_hsgd.ft.reseed import replica_rank_seed
    from elastic_hsgd.ft.wiring import resume_group

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        averager = HierarchicalModelAverager({2: "world"}, warmup_steps=0)
        return CheckpointManager(str(tmp_path)), {"model": model, "averager": averager}, averager

    manager, state, averager = build()
    for _ in range(4):
        averager.average_parameters([])
    manager.save(4, state)  # the writer group's files, its RNG state inside
    drawn, plain = {}, {}
    for group in ("0", "1"):
        manager, state, averager = build()
        resume(manager, state, averager, seed=3)
        plain[group] = torch.rand(4).tolist()
        manager, state, averager = build()
        assert resume_group(manager, state, averager, replica_group=group, seed=3).step == 4
        drawn[group] = torch.rand(4).tolist()
    assert plain["0"] == plain["1"]  # what elastic.resume alone does: every group repeats the writer's stream
    assert drawn["0"] != drawn["1"]
    for group in ("0", "1"):
        expected = torch.Generator().manual_seed(replica_rank_seed(3, 4, group, 0))
        assert drawn[group] == torch.rand(4, generator=expected).tolist()


def test_replica_rank_seed_is_the_documented_hash():
    import hashlib

    from elastic_hsgd.elastic import rank_seed
    from elastic_hsgd.ft.reseed import replica_rank_seed

    digest = hashlib.sha256(b"elastic_hsgd.replica_rank_seed/7/120/2/3").digest()
    assert replica_rank_seed(7, 120, "002", 3) == int.from_bytes(digest[:8], "big") & (2**63 - 1)
    seeds = {replica_rank_seed(0, 50, group, rank) for group in range(8) for rank in range(8)}
    assert len(seeds) == 64 and rank_seed(0, 50, 0) not in seeds
    with pytest.raises(ValueError, match="step=-1 must be an int >= 0"):
        replica_rank_seed(0, -1, 0, 0)
