"""deploy/: manifests validate offline, and the pytorch container's command runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.k8s_validation import SCHEMA_PATH, mutated, pytorch_container, pytorchjobs, render_kustomization, validate_pytorchjob

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = sorted(p for p in (ROOT / "deploy" / "k8s" / "overlays").iterdir() if p.is_dir())
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (built-in kustomize) renders the overlays")


def _rendered(overlay: str) -> list[dict]:
    return render_kustomization(ROOT / "deploy" / "k8s" / "overlays" / overlay)


def test_schema_copy_matches_its_source_when_shared_is_present():
    source = ROOT.parent / "shared" / "k8s" / "kubeflow.org_pytorchjobs.yaml"
    if not source.exists():
        pytest.skip("../shared/k8s is not beside this checkout")
    import yaml

    schema = yaml.safe_load(source.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "description"}
        return [strip(v) for v in x] if isinstance(x, list) else x

    assert json.loads(SCHEMA_PATH.read_text()) == strip(schema)


def test_every_overlay_is_there():
    assert [p.name for p in OVERLAYS] == ["gcs", "gpu-s3", "s3"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_rendered_overlay_is_valid(overlay):
    docs = render_kustomization(overlay)
    jobs = list(pytorchjobs(docs))
    assert len(jobs) == 1
    assert validate_pytorchjob(jobs[0]) == []
    # The ConfigMap and every reference to it carry the overlay's suffix.
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["metadata"]["name"] == jobs[0]["metadata"]["name"] == f"digits-hsgd-{overlay.name}"
    refs = {v["valueFrom"]["configMapKeyRef"]["name"] for v in pytorch_container(jobs[0])["env"] if "configMapKeyRef" in v.get("valueFrom", {})}
    assert refs == {config["metadata"]["name"]}
    assert config["data"]["CHECKPOINT_URL"].startswith("gs://" if overlay.name == "gcs" else "s3://")


def _job(overlay: str = "s3") -> dict:
    return next(pytorchjobs(_rendered(overlay)))


@needs_kubectl
@pytest.mark.parametrize(
    "breakage, field",
    [
        (lambda j: j["spec"]["elasticPolicy"].update(minReplica=1), "spec.elasticPolicy: Additional properties are not allowed ('minReplica'"),
        (lambda j: j["spec"]["elasticPolicy"].update(minReplicas=5, maxReplicas=2), "spec.elasticPolicy.minReplicas: 5 is greater than maxReplicas 2"),
        (lambda j: pytorch_container(j).update(name="trainer"), "containers: one container must be named 'pytorch'"),
        (lambda j: pytorch_container(j)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}), "AWS_SECRET_ACCESS_KEY is inline"),
        (lambda j: j["spec"]["elasticPolicy"].update(nProcPerNode=2), "spec.elasticPolicy.nProcPerNode: must not be set together"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Worker"]), "pytorchReplicaSpecs.Chief: replica type"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two"), "Worker.replicas: 'two' is not of type 'integer'"),
        (lambda j: pytorch_container(j).pop("image"), "containers.0.image: required"),
        (lambda j: pytorch_container(j).update(env=[]), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is required"),
    ],
)
def test_broken_copies_are_rejected_naming_the_field(breakage, field):
    problems = validate_pytorchjob(mutated(_job(), breakage))
    assert any(field in p for p in problems), problems


def _container_env(docs: list[dict], overrides: dict[str, str], secrets: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The pytorch container's argv and env as the kubelet would make them."""
    config = {k: v for d in docs if d.get("kind") == "ConfigMap" for k, v in d["data"].items()}
    config.update(overrides)
    container = pytorch_container(next(pytorchjobs(docs)))
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            env[var["name"]] = config[var["valueFrom"]["configMapKeyRef"]["key"]]
        else:
            env[var["name"]] = secrets[var["valueFrom"]["secretKeyRef"]["key"]]
    # Kubernetes expands $(VAR) in command and args from the container's env.
    expand = lambda s: re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), s)
    argv = [expand(a) for a in container["command"] + container.get("args", [])]
    return argv, env


def _operator_env(job: dict, port: int) -> dict[str, str]:
    """What the training operator injects for an elasticPolicy (../shared/k8s/README.md)."""
    policy = job["spec"]["elasticPolicy"]
    return {
        "PET_RDZV_BACKEND": policy["rdzvBackend"],
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}",
        "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}",
        "PET_NPROC_PER_NODE": str(job["spec"]["nprocPerNode"]),
        "PET_MAX_RESTARTS": str(policy["maxRestarts"]),
        "PET_RDZV_ID": job["metadata"]["name"],
        "PET_RDZV_CONF": ",".join(f"{kv['key']}={kv['value']}" for kv in policy["rdzvConf"]),
        "PYTHONUNBUFFERED": "1",
    }


def _run_container(argv: list[str], env: dict[str, str], timeout_s: float = 180) -> list[dict]:
    assert argv[0] == "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@needs_kubectl
def test_manifest_command_runs_and_checkpoints_land_in_s3(s3_bucket, tmp_path):
    from tests.conftest import s3_options

    bucket, options = s3_bucket
    docs = _rendered("s3")
    job = next(pytorchjobs(docs))
    overrides = {"CHECKPOINT_URL": f"{bucket}/digits", "STORAGE_OPTIONS": json.dumps({"client_kwargs": options["client_kwargs"]})}
    argv, env = _container_env(docs, overrides, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    assert "--checkpoint-url=" + overrides["CHECKPOINT_URL"] in argv
    # A short run: later flags override the manifest's (argparse keeps the last).
    short = ["--steps=12", "--checkpoint-every=6", "--warmup-steps=2"]
    argv = argv + [f"--local-checkpoint-url={tmp_path / 'local'}"]  # the pod's emptyDir, here a folder of the test
    env.update(_operator_env(job, free_port()))
    env["PET_RDZV_CONF"] = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"  # one pod: no need to wait
    first = _run_container(argv + short, env)
    assert first[-1]["event"] == "done" and first[-1]["step"] == 12

    import s3fs

    fs = s3fs.S3FileSystem(**s3_options(options["client_kwargs"]["endpoint_url"]))
    fs.invalidate_cache()
    committed = sorted(fs.glob(f"{bucket}/digits/step_*/COMMIT.json"))
    assert [p.rsplit("/", 2)[-2] for p in committed] == ["step_000000000006", "step_000000000012"]

    env["PET_RDZV_ENDPOINT"] = f"127.0.0.1:{free_port()}"
    second = _run_container(argv + ["--steps=18", "--checkpoint-every=6", "--warmup-steps=2"], env)
    resumed = next(e for e in second if e["event"] == "resumed")
    assert resumed["step"] == 12 and resumed["world_size"] == int(job["spec"]["nprocPerNode"])
    assert second[-1]["step"] == 18


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_local_checkpoint_tier_is_a_memory_emptydir_mounted_where_the_flag_points(overlay):
    job = next(pytorchjobs(render_kustomization(overlay)))
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    container = pytorch_container(job)
    url = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--local-checkpoint-url="))
    assert any(a.startswith("--local-checkpoint-every=") for a in container["args"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == url)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]
