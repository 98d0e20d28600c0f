"""Goodput under churn: useful training per wall-clock second while workers and nodes come and go.

    python bench/goodput.py [--task lm] [--wall 240] [--every 60] [--seed 0]

Two torchrun agents x 2 workers on 127.0.0.1 (elastic, ``--nnodes=1:2``, c10d rendezvous hosted
by the first agent) train the same job (``examples/train_lm.py`` with a small model by default,
or ``train_digits.py``) for ``--wall`` seconds each row. Every ``--every`` seconds a seeded
schedule, printed first so a run can be repeated, either SIGKILLs one worker (its agent restarts
the world) or SIGKILLs the second agent and its workers (a lost node: the world shrinks to 2),
and starts a new agent ``--down`` seconds later (the world grows back to 4).

    goodput = (steps that survive into the final model) x (failure-free seconds per step) / wall seconds

"Survive" means committed in the newest checkpoint when the wall time is up (the job is then
stopped, as a preempted job would be); failure-free seconds per step come from the first row,
the same job without failures (its steady state: checkpoints included, start-up excluded), so
that row's goodput shows what start-up and the final partial interval cost on their own.
Rows: no failures; torchrun restart + cloud checkpoints (an S3 API server, ``moto_server`` on
127.0.0.1, unless ``--cloud-url`` names another); the same plus the node-local tier every
``--local-every`` steps (each agent its own folder under the log folder, a returning node a new
empty one; steps survive when committed in either tier: a local step commits only once every rank
and its buddy copy on the other node are written); torchft replica groups (``--task digits`` only:
the replica-group mode exists in ``train_digits.py`` alone).

The replica-group row keeps the worker count: 2 replica groups x 2 workers (each group its own
torchrun agent and rendezvous, ``--max-restarts=1000``), a real ``torchft_lighthouse`` on
127.0.0.1 (the test flags: ``--min_replicas 1``, heartbeat timeout 1 s, join timeout 10 s),
hierarchy ``2:2,8:replicas`` (the same two levels as ``2:local,8:world``: average inside the
2-worker node every 2 steps, across all 4 workers every 8), ``--ft-timeout 3``. A "node" failure
SIGKILLs the second group's agent and workers (the first, like the first agent, is never killed)
and starts it again ``--down`` seconds later (it heals from the live group); a "worker" failure
SIGKILLs one live worker by pid (its group's agent restarts that group, which heals). Survivors
lose no steps, so the row's surviving steps are the final model's step: the highest step a live
group reached when the time is up (its last progress event, or the newest checkpoint if later); the step committed in the
checkpoint is printed next to it.

    python bench/goodput.py --task digits --wall 150 --every 45 --rows reference,ft
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from elastic_hsgd.checkpoint.storage import Storage  # noqa: E402
from tests.distributed import free_port  # noqa: E402
from tests.ft_job import ReplicaGroups  # noqa: E402
from tests.torchrun_job import EXAMPLE, LM_EXAMPLE, Agent, elastic_nodes, events_of_every_agent, stop_all, wait_port  # noqa: E402

ROWS = ("reference", "ft", "cloud", "local")

JOBS = {
    "lm": (LM_EXAMPLE, ["--width", "64", "--layers", "2", "--heads", "4", "--context", "64", "--batch-size", "8", "--corpus-bytes", "1000000", "--val-windows", "8"]),
    "digits": (EXAMPLE, []),
}


@dataclass(frozen=True)
class Failure:
    at_s: float
    kind: str  # "worker": SIGKILL one worker; "node": SIGKILL the second agent and its workers
    worker: int  # which live worker (by sorted pid), for "worker"


def schedule(seed: int, wall_s: float, every_s: float, down_s: float) -> list[Failure]:
    """A failure every ``every_s`` seconds, kind and victim drawn from ``seed``; the last one
    leaves time for a node to come back (``down_s``) before the wall time is up."""
    rng = random.Random(seed)
    out, t = [], every_s
    while t + down_s < wall_s:
        out.append(Failure(t, rng.choice(["worker", "node"]), rng.randrange(4)))
        t += every_s
    return out


class Churn:
    """Two agents on 127.0.0.1; applies a failure schedule and brings lost nodes back."""

    def __init__(self, script: str, job_args: list[str], log_dir: Path, local_root: Path | None = None, local_every: int = 0) -> None:
        port = free_port()
        self.torchrun = elastic_nodes(port, "goodput", max_restarts=1000)
        self.script, self.job_args, self.log_dir = script, job_args, log_dir
        self.local_root, self.local_every = local_root, local_every
        self.host = self._agent("host")  # holds the rendezvous store: never killed
        wait_port(port, self.host, 60)
        self.second: Agent | None = self._agent("node-0")
        self.agents = [self.host, self.second]
        self.log: list[str] = []

    def apply(self, failure: Failure, t0: float, until_s: float) -> None:
        """Apply ``failure`` now, or as soon as its target is up (a restart may still be under way), before ``until_s``."""
        while True:
            now = time.monotonic() - t0
            late = f" ({now - failure.at_s:.1f} s late: target not up before)" if now - failure.at_s > 0.5 else ""
            if failure.kind == "node":
                if self.second is not None and self.second.proc.poll() is None and self.second.worker_pids():
                    self.second.kill()
                    self.second = None
                    self.log.append(f"{now:6.1f} s  SIGKILL second agent + its workers{late}")
                    return
            else:
                pids = sorted(pid for agent in self.agents if agent.proc.poll() is None for pid in agent.worker_pids())
                if pids:
                    victim = pids[failure.worker % len(pids)]
                    try:
                        os.kill(victim, signal.SIGKILL)
                        self.log.append(f"{now:6.1f} s  SIGKILL worker pid {victim}{late}")
                        return
                    except ProcessLookupError:
                        pass  # exited between listing and kill: pick again
            if now >= until_s:
                self.log.append(f"{now:6.1f} s  {failure.kind} failure skipped: no target up since {failure.at_s:.1f} s")
                return
            time.sleep(0.05)

    def _agent(self, name: str) -> Agent:
        """A new agent; with a local tier, its own node-local folder (a new node starts with an empty one)."""
        local = [] if self.local_root is None else ["--local-checkpoint-url", str(self.local_root / name), "--local-checkpoint-every", str(self.local_every)]
        return Agent(self.torchrun, [*self.job_args, *local], self.log_dir, name, self.script)

    def bring_back(self, t0: float) -> None:
        self.second = self._agent(f"node-{len(self.agents)}")
        self.agents.append(self.second)
        self.log.append(f"{time.monotonic() - t0:6.1f} s  new agent joins")

    def stop(self) -> None:
        stop_all(self.agents)


class FtChurn:
    """Two torchft replica groups of 2 workers each and a real lighthouse; same schedule, a lost "node" is a whole group."""

    def __init__(self, job_args: list[str], log_dir: Path) -> None:
        self.job_args = job_args
        self.groups = ReplicaGroups(log_dir)
        self.agents = self.groups.agents  # every group started, in order (the same list)
        self.host = self._group(0, "group0")  # never killed, like the rendezvous host
        self.second: Agent | None = self._group(1, "group1")
        self.log: list[str] = []

    def _group(self, group: int, name: str) -> Agent:
        return self.groups.start(group, self.job_args, name, max_restarts=1000)

    apply = Churn.apply  # same victims: the second agent (here a whole group), or a live worker by pid

    def bring_back(self, t0: float) -> None:
        self.second = self._group(1, f"group1-{len(self.agents)}")
        self.log.append(f"{time.monotonic() - t0:6.1f} s  group 1 started again")

    def stop(self) -> None:
        self.groups.stop()


def run_row(
    name: str, failures: list[Failure], url: str, storage_options: dict, args: argparse.Namespace, log_dir: Path, local: bool = False, ft: bool = False
) -> dict:
    script, model_args = JOBS[args.task]
    job_args = [
        *model_args, "--steps", "100000000", "--checkpoint-every", str(args.checkpoint_every), "--log-every", "5",
        "--hierarchy", "2:2,8:replicas" if ft else "2:local,8:world", "--warmup-steps", "10", "--collective-timeout", "10",
        "--checkpoint-url", url, "--storage-options", json.dumps(storage_options), *(["--ft-timeout", "3"] if ft else []),
    ]
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    churn = FtChurn(job_args, log_dir) if ft else Churn(script, job_args, log_dir, log_dir / "local" if local else None, args.local_every)
    pending = sorted([(f.at_s, 0, f) for f in failures] + [(f.at_s + args.down, 1, None) for f in failures if f.kind == "node"], key=lambda x: x[:2])
    try:
        for index, (at_s, _, failure) in enumerate(pending):
            while time.monotonic() - t0 < at_s:
                time.sleep(0.05)  # a timer, not synchronisation: the schedule is in wall seconds
            if failure is not None:
                next_s = pending[index + 1][0] if index + 1 < len(pending) else args.wall
                churn.apply(failure, t0, until_s=next_s)
            elif churn.second is None:
                churn.bring_back(t0)
        while time.monotonic() - t0 < args.wall:
            time.sleep(0.05)
    finally:
        churn.stop()
    committed = Storage(url, storage_options).committed_steps()
    if ft:
        return ft_result(name, churn, committed, t0)
    # Rank 0 prints the JSON lines, on whichever agent the rendezvous ordered first (by address, then pid:
    # a new agent whose pid wrapped around takes ranks 0-1 from the survivor), so every agent's are read.
    sources = events_of_every_agent(churn.agents)
    events = [e for e, _ in sources]
    if local:
        # A local step is committed only once every rank's file and its buddy copy are written, and the
        # never-killed host holds its own ranks plus copies of the other node's: a restart resumes from it.
        committed = sorted(set(committed) | set(Storage(str(log_dir / "local" / "host")).committed_steps()))
    progress = [e for e in events if e["event"] == "progress"]
    starts = [e for e in events if e["event"] in ("started", "resumed")]
    return {
        "name": name,
        "survived": committed[-1] if committed else 0,
        "reached": max((e["step"] for e in progress), default=0),
        "starts": len(starts),
        "worlds": [e["world_size"] for e in starts],
        "full_world_steps": full_world_steps([(e["step"], e["world_size"]) for e in starts], committed[-1] if committed else 0),
        "progress": [(e["step"], e["_t"]) for e in progress],
        "log": sorted(churn.log + [
            f"{e['_t'] - t0:6.1f} s  {e['event']} at step {e['step']}, world {e['world_size']}"
            + (f", from {e['source']}" if e.get("source") else "") + f" (rank 0 on {name})"
            for e, name in sources if e["event"] in ("started", "resumed")
        ]),
    }


def ft_result(name: str, churn: FtChurn, committed: list[int], t0: float) -> dict:
    """Surviving steps = the final model's step: the highest step a group alive at the end reached."""
    live = [a for a in churn.agents if a is churn.host or a is churn.second]
    final = max((e["step"] for a in live for e in a.snapshot() if e["event"] == "progress"), default=0)
    final = max(final, committed[-1] if committed else 0)  # progress lines come every 5 steps: a checkpoint can be newer
    joins = [(who, e) for e, who in events_of_every_agent(churn.agents) if e["event"] in ("started", "resumed", "healed")]
    quorums = [e["replicas"] for e in churn.host.snapshot() if e["event"] == "quorum"]
    log = [f"{e['_t'] - t0:6.1f} s  {who}: {e['event']} at step {e['step']}" + (f" from group {e['source_replica']}" if e["event"] == "healed" else "") for who, e in joins]
    log += [f"{e['_t'] - t0:6.1f} s  group0: quorum of {e['replicas']} group(s) at step {e['step']}" for e in churn.host.snapshot() if e["event"] == "quorum"]
    return {
        "name": name,
        "survived": final,
        "committed": committed[-1] if committed else 0,
        "reached": final,
        "starts": len(joins),
        "worlds": [2 * r for r in quorums],
        # A step taken while a group is away trains 2 workers' batches, not 4: weigh it so.
        "full_world_steps": full_world_steps([(e["step"], 2 * e["replicas"]) for e in churn.host.snapshot() if e["event"] == "quorum"], final),
        "progress": [(e["step"], e["_t"]) for e in churn.host.snapshot() if e["event"] == "progress"],
        "log": sorted(churn.log + log),
    }


def full_world_steps(segments: list[tuple[int, int]], final_step: int, full_world: int = 4) -> float:
    """Steps up to ``final_step`` weighted by the workers that trained them / ``full_world``
    (each worker draws its own batch, so a step of 2 workers is half the samples of one of 4).

    ``segments``: (first step, workers) in time order; a later one starting at or before an earlier
    one's step replaces it from there (a resume from a checkpoint redoes those steps).

    >>> full_world_steps([(0, 4), (100, 2), (150, 4)], 200)
    175.0
    >>> full_world_steps([(0, 4), (100, 4), (50, 4)], 80)  # resumed at 50: steps 50..79 once
    80.0
    """
    kept: list[tuple[int, int]] = []
    for start, workers in segments:
        kept = [seg for seg in kept if seg[0] < start] + [(start, workers)]
    bounds = [start for start, _ in kept[1:]] + [final_step]
    return sum(max(0, min(end, final_step) - start) * workers / full_world for (start, workers), end in zip(kept, bounds))


def steady_seconds_per_step(progress: list[tuple[int, float]]) -> float:
    """Seconds per step between the first and last progress event of one uninterrupted world."""
    (s0, t0), (s1, t1) = progress[0], progress[-1]
    if s1 <= s0:
        raise RuntimeError(f"the failure-free run made no progress after its first event: {progress[:3]}")
    return (t1 - t0) / (s1 - s0)


def start_moto(log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=open(log_dir / "moto.stderr", "w"))
    endpoint = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).read()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"moto_server did not come up on {endpoint}; see {log_dir / 'moto.stderr'}")
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(JOBS), default="lm")
    parser.add_argument("--wall", type=float, default=240.0, help="seconds per row")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between failures")
    parser.add_argument("--down", type=float, default=10.0, help="seconds a lost node stays away")
    parser.add_argument("--seed", type=int, default=0, help="seeds the failure schedule")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--local-every", type=int, default=5, help="node-local tier cadence in steps (its row)")
    parser.add_argument("--cloud-url", help="checkpoint URL for the cloud rows (default: a bucket on a local moto_server)")
    parser.add_argument("--storage-options", default="{}", help="JSON for --cloud-url")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows to run, from {','.join(ROWS)} (reference is always run: goodput needs it)")
    parser.add_argument("--out", default=None, help="folder for logs (default: a new temp folder)")
    args = parser.parse_args()
    wanted = {"reference", *args.rows.split(",")}
    if not wanted <= set(ROWS):
        parser.error(f"--rows {args.rows!r}: unknown row(s) {sorted(wanted - set(ROWS))}; choose from {','.join(ROWS)}")
    if "ft" in wanted and args.task != "digits":
        parser.error("--rows with ft needs --task digits: the replica-group (torchft) mode exists only in examples/train_digits.py")
    out = Path(args.out or tempfile.mkdtemp(prefix="elastic-hsgd-goodput-"))
    out.mkdir(parents=True, exist_ok=True)

    failures = schedule(args.seed, args.wall, args.every, args.down)
    print(f"schedule (seed {args.seed}, a failure every {args.every:g} s, lost nodes back after {args.down:g} s, {args.wall:g} s per row):")
    for f in failures:
        print(f"  t={f.at_s:6.1f} s  {f.kind}" + (f" (live worker #{f.worker} by pid)" if f.kind == "worker" else " (second agent + workers)"))
    sys.stdout.flush()

    moto = None
    try:
        if args.cloud_url:
            cloud_base, options = args.cloud_url.rstrip("/"), json.loads(args.storage_options)
        else:
            import s3fs

            moto, endpoint = start_moto(out)
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
            options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
            s3fs.S3FileSystem(**options).mkdir("goodput")
            cloud_base = "s3://goodput"
        rows = []
        for name, row_failures, key in [
            ("no failures (reference), cloud checkpoints", [], "reference"),
            ("torchft replica groups (2 groups x 2 workers) + cloud checkpoints", failures, "ft"),
            ("torchrun restart + cloud checkpoints", failures, "cloud"),
            (f"+ node-local checkpoint tier (every {args.local_every} steps, own folder per agent)", failures, "local"),
        ]:
            if key not in wanted:
                continue
            rows.append(run_row(name, row_failures, f"{cloud_base}/{key}", options, args, out / key, local=key == "local", ft=key == "ft"))
            r = rows[-1]
            extra = f" (final model; {r['committed']} in the checkpoint)" if "committed" in r else " committed"
            print(f"{name}: {r['survived']} steps{extra}, worlds {r['worlds']}", flush=True)
            for line in r["log"]:
                print("   ", line)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)

    t_step = steady_seconds_per_step(rows[0]["progress"])
    print()
    print(f"{args.task} job, 2 agents x 2 workers on 127.0.0.1, checkpoint every {args.checkpoint_every} steps, "
          f"failure-free {t_step * 1000:.0f} ms/step, {args.wall:g} s wall per row, logs in {out}")
    print()
    print("| configuration | steps surviving | steps committed | steps reached | (re)starts | world sizes | goodput | 4-worker steps | goodput, 4-worker steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        goodput = r["survived"] * t_step / args.wall
        worlds = " ".join(str(w) for w in r["worlds"])
        print(f"| {r['name']} | {r['survived']} | {r.get('committed', r['survived'])} | {r['reached']} | {r['starts']} | {worlds} | {goodput:.2f} "
              f"| {r['full_world_steps']:.0f} | {r['full_world_steps'] * t_step / args.wall:.2f} |")
    if "ft" not in wanted:
        print("| torchft replica groups | not run: needs --task digits and ft in --rows | | | | | | | |")
    print()
    print("steps surviving: committed in the newest checkpoint (torchrun rows); the final model's step (replica groups: survivors lose none).")
    print("(re)starts: started/resumed lines of rank 0 (on whichever agent holds it); for replica groups, started/resumed/healed lines of every group.")
    print("world sizes: per (re)start; for replica groups, 2 x the groups in each quorum group 0 saw.")
    print("4-worker steps: surviving steps weighted by the workers that trained them / 4 (a step of one 2-worker group alone is half the samples).")


if __name__ == "__main__":
    main()
