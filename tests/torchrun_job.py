"""The torchrun harness of the tests and benches: start real torchrun agents, read their workers'
JSON lines, wait for one with a deadline, kill agents and workers by pid, stop everything.

Tests import it as ``tests.torchrun_job``; the bench scripts put the repo root on ``sys.path``
first. Every wait polls with a deadline; nothing sleeps to synchronise.

Example::

    >>> # xdoctest: +SKIP("starts a real torchrun agent with 4 workers")
    >>> agent = Agent(single_node(free_port()), ["--steps", "40", "--checkpoint-url", "/tmp/c"], Path("/tmp"), "demo")
    >>> run = kill_worker_then_finish(agent, lambda e: e["event"] == "checkpoint", "a checkpoint")
    >>> run.resumed["step"], run.done["params_sha256"]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
EXAMPLE = str(EXAMPLES / "train_digits.py")
LM_EXAMPLE = str(EXAMPLES / "train_lm.py")
FAST_RDZV = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3"
# torch 2.13's shared rendezvous store breaks worker restarts (pytorch#135712); one thread per
# worker, since every worker of every agent shares the same few cores.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}


def single_node(port: int, nproc: int = 4, max_restarts: int | None = 3, monitor_interval: float | None = 0.2) -> list[str]:
    """torchrun flags for one agent of ``nproc`` workers hosting a c10d rendezvous on 127.0.0.1:``port``.

    ``None`` leaves ``--max-restarts`` or ``--monitor-interval`` at torchrun's default.
    """
    flags = ["--nnodes=1", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    if max_restarts is not None:
        flags.append(f"--max-restarts={max_restarts}")
    if monitor_interval is not None:
        flags.append(f"--monitor-interval={monitor_interval}")
    return flags


def elastic_nodes(port: int, rdzv_id: str, max_restarts: int = 5) -> list[str]:
    """torchrun flags for one of 1-2 elastic agents x 2 workers on the rendezvous 127.0.0.1:``port``
    (the first agent to start hosts it), with fast scale-down (:data:`FAST_RDZV`)."""
    return [
        "--nnodes=1:2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={rdzv_id}", f"--rdzv-conf={FAST_RDZV}", f"--max-restarts={max_restarts}", "--monitor-interval=0.2",
    ]


def torchrun_command(torchrun_args: Sequence[str], script: str, script_args: Sequence[str] = ()) -> list[str]:
    """``python -m torch.distributed.run`` with this interpreter (the one torch is installed in)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args, script, *script_args]


class Agent:
    """One torchrun agent with its workers; a thread collects rank 0's JSON lines as they arrive."""

    def __init__(
        self, torchrun_args: list[str], script_args: list[str], log_dir: Path, name: str, script: str = EXAMPLE, env: dict[str, str] | None = None
    ):
        env = {**os.environ, **TORCHRUN_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            torchrun_command(torchrun_args, script, script_args),
            stdout=subprocess.PIPE,
            stderr=open(self.stderr_path, "w"),
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                event["_t"] = time.monotonic()  # arrival time, for recovery measurements
                with self._lock:
                    self.events.append(event)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.events)

    def wait_for(self, predicate: Callable[[dict], bool], deadline_s: float, what: str) -> dict:
        """The first JSON line (since the start) that ``predicate`` accepts, polled for up to ``deadline_s``;
        fails at once if the agent exited and every line it printed was seen."""
        end = time.monotonic() + deadline_s
        seen = 0
        while time.monotonic() < end:
            events = self.snapshot()
            for event in events[seen:]:
                if predicate(event):
                    return event
            seen = len(events)
            if self.proc.poll() is not None and len(self.snapshot()) == seen:
                break
            time.sleep(0.01)
        raise AssertionError(f"{self.name}: no {what} within {deadline_s} s; events {self.snapshot()[-8:]}; stderr tail:\n{self.stderr_tail()}")

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            return self.stderr_path.read_text()[-n:]
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """Worker processes this agent started (torchrun puts them in sessions of their own).

        Each agent's stdout carries only its own workers' lines; pids of workers
        that already exited are skipped.
        """
        return [e["pid"] for e in self.snapshot() if e.get("event") == "worker" and _alive(e["pid"])]

    def worker_pid(self, rank: int) -> int:
        """The pid of the first worker that logged ``rank``."""
        return next(e["pid"] for e in self.snapshot() if e["event"] == "worker" and e["rank"] == rank)

    def kill_worker(self, rank: int = 1) -> int:
        """SIGKILL the first worker that logged ``rank`` (its agent restarts the world); returns its pid."""
        victim = self.worker_pid(rank)
        os.kill(victim, signal.SIGKILL)
        return victim

    def kill(self) -> None:
        """SIGKILL this agent's workers and the agent itself, as a lost node (see :meth:`stop`)."""
        pids = self.stop()
        assert pids, f"{self.name}: no live worker pids known; events {self.snapshot()}"

    def stop(self) -> list[int]:
        """SIGKILL the agent, its process group and its workers, and wait until they are gone; the workers' pids.

        Workers survive their agent's SIGKILL and live in sessions of their own, so
        the group kill misses them: each is killed by pid, the ones that logged and
        every process below the agent (a worker of a restart that has not logged
        yet; left alive, it would compete for the CPU with whatever runs next).
        """
        pids = self.worker_pids()
        if self.proc.poll() is None:
            _sigstop(self.proc.pid)  # it starts no worker while its children are listed
            pids = sorted({*pids, *descendants(self.proc.pid)})
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            _sigkill(pid)
        self.proc.wait(timeout=10)
        end = time.monotonic() + 10
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < end, f"{self.name}: workers {pids} survived SIGKILL"
            time.sleep(0.01)
        return pids


def _sigstop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        pass  # already gone


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:  # (else it exited while listing)
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def _stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent pid, ...); empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def stop_all(stoppables: Iterable) -> None:
    """Teardown of agents (and a lighthouse): ``stop()`` each in order, every one even if one fails."""
    first_error: BaseException | None = None
    for thing in stoppables:
        try:
            thing.stop()
        except BaseException as error:  # noqa: BLE001 - raised below, once the rest are stopped
            first_error = first_error or error
    if first_error is not None:
        raise first_error


def wait_listening(port: int, proc: subprocess.Popen, deadline_s: float, timeout_message: str, log: Callable[[], str]) -> None:
    """Poll until something listens on 127.0.0.1:``port``; fail at once, showing ``log()``, if ``proc`` exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None, log()
        time.sleep(0.02)
    raise AssertionError(timeout_message)


def wait_port(port: int, agent: Agent, deadline_s: float = 30) -> None:
    """Wait until ``agent`` (the first of several) hosts its rendezvous store on ``port``."""
    wait_listening(port, agent.proc, deadline_s, f"rendezvous port {port} never opened", agent.stderr_tail)


def wait_for_file(path: Path, agent: Agent, deadline_s: float, message: str) -> None:
    """Poll until ``path`` exists; fail with ``message`` and the stderr tail at the deadline or if ``agent`` exits."""
    end = time.monotonic() + deadline_s
    while not path.exists():
        assert time.monotonic() < end and agent.proc.poll() is None, f"{message}: {agent.stderr_tail()}"
        time.sleep(0.01)


def run_to_done(agent: Agent, deadline_s: float = 150) -> dict:
    """Rank 0's ``done`` line, then the agent's exit (30 s); the agent is stopped either way."""
    try:
        done = agent.wait_for(lambda e: e["event"] == "done", deadline_s, "done line")
        agent.proc.wait(timeout=30)
        return done
    finally:
        agent.stop()


def run_to_exit(agent: Agent, deadline_s: float = 90) -> None:
    """Wait up to ``deadline_s`` for the agent to exit by itself; it is stopped either way."""
    try:
        agent.proc.wait(timeout=deadline_s)
    finally:
        agent.stop()


@dataclass(frozen=True)
class WorkerKill:
    """What rank 0 logged around one SIGKILLed worker."""

    killed_at: float  # time.monotonic() just after the SIGKILL
    resumed: dict  # the first "resumed" line
    done: dict  # the "done" line


def kill_worker_then_finish(
    agent: Agent, ready: Callable[[dict], bool], what: str, ready_s: float = 90, resumed_s: float = 90, done_s: float = 150
) -> WorkerKill:
    """Wait for a line ``ready`` accepts, SIGKILL rank 1, wait for the resume, then run to done.

    The agent is stopped either way.
    """
    try:
        agent.wait_for(ready, ready_s, what)
        agent.kill_worker(1)
        killed_at = time.monotonic()
        resumed = agent.wait_for(lambda e: e["event"] == "resumed", resumed_s, "resumed line")
        done = run_to_done(agent, done_s)
    finally:
        agent.stop()
    return WorkerKill(killed_at, resumed, done)


def step_reached_by(agent: Agent, t: float) -> int:
    """The highest step of a ``progress`` line that arrived by ``time.monotonic()`` == ``t`` (0 if none)."""
    return max((e["step"] for e in agent.snapshot() if e["event"] == "progress" and e["_t"] <= t), default=0)


def events_of_every_agent(agents: Iterable[Agent]) -> list[tuple[dict, str]]:
    """(JSON line, agent name) of every agent, in arrival order.

    Rank 0 prints the lines on whichever agent the rendezvous ordered first (by address, then pid),
    which can change at every restart.
    """
    return sorted(((e, agent.name) for agent in agents for e in agent.snapshot()), key=lambda pair: pair[0]["_t"])


def blocking_fs_env(tmp_path: Path, match: str, marker: Path, *, from_step: int | None = None) -> dict[str, str]:
    """Env for workers that register ``blockingfile://`` (see ``tests/faulty_fs.py``): the first write of a
    file whose path contains ``match`` (with ``from_step``: a rank file of a step at least that one) parks
    after one chunk and writes the writer's pid to ``marker``."""
    from tests.faulty_fs import BLOCK_FROM_STEP_ENV, BLOCK_MARKER_ENV, BLOCK_MATCH_ENV, SITECUSTOMIZE

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]),
        BLOCK_MATCH_ENV: match, BLOCK_MARKER_ENV: str(marker),
        **({} if from_step is None else {BLOCK_FROM_STEP_ENV: str(from_step)}),
    }
