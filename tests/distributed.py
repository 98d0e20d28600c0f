"""Run a function in N real gloo processes and collect what each returns."""

from __future__ import annotations

import logging

import multiprocessing as mp
import os
import queue
import random
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

DEFAULT_DEADLINE_S = 120.0


def free_port() -> int:
    """A port free on 127.0.0.1 now, picked below the kernel's ephemeral range.

    A port from ``bind(("127.0.0.1", 0))`` can be handed out again by the kernel
    before the caller's process binds it: to an outgoing connection, or to one of
    the listeners gloo and TCPStore open on ephemeral ports in a test running
    beside this one (a torchrun agent then joined a stranger's socket as if it
    were its rendezvous store). Ports below the range are never handed out by the
    kernel, so only another caller of this function can pick the same one.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    pick = random.SystemRandom()
    for _ in range(1000):
        port = pick.randrange(10000, max(low, 10001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or in TIME_WAIT): pick another
            return port
    raise RuntimeError(f"no free port found in 10000-{low - 1} on 127.0.0.1")


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, env: dict, results: Any, args: tuple) -> None:
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - reported to the parent test
        results.put((rank, "error", traceback.format_exc()))


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    env: dict[str, str] | None = None,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> list[Any]:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes.

    Returns the per-rank return values; raises with every failing rank's
    traceback. Every process is gone when this returns.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, env or {}, results, args), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(outcomes) < world_size:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"workers did not finish in {deadline_s} s; got ranks {sorted(outcomes)}")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(outcomes) < world_size and not any(s == "error" for s, _ in outcomes.values()):
                    # A worker died without reporting (e.g. a segfault): do not wait for the deadline.
                    raise RuntimeError(f"worker exited with code {dead[0].exitcode} without a result")
                continue
            outcomes[rank] = (status, value)
            if status == "error":
                # Others are likely blocked in a collective with the failed rank.
                break
    finally:
        for proc in procs:
            proc.join(timeout=5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(outcomes.items()) if s == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [outcomes[r][1] for r in range(world_size)]


def collect_package_warnings() -> list[str]:
    """The messages of every WARNING (or worse) the package logs in this process from now on."""
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("elastic_hsgd").addHandler(Collect())
    return warnings


def clone_tree(value: Any) -> Any:
    """A deep copy of a state tree (dicts, lists, tuples) with every tensor detached and cloned."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tree(v) for v in value)
    return value
