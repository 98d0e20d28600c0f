"""Offline checks of PyTorchJob manifests: the CRD's schema (unknown fields
rejected), the training operator's admission-webhook rules, and this project's
rules (elastic settings, no inline secrets)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).parent / "data" / "pytorchjob_v1_openapi_schema.json"
SECRETISH = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|ACCOUNT_KEY)", re.IGNORECASE)


def closed_schema(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists
    its properties: an API server silently drops unknown fields, so a typo'd
    field would otherwise pass."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


_VALIDATOR = None


def _validator() -> jsonschema.protocols.Validator:
    global _VALIDATOR
    if _VALIDATOR is None:
        schema = closed_schema(json.loads(SCHEMA_PATH.read_text()))
        _VALIDATOR = jsonschema.Draft7Validator(schema)
    return _VALIDATOR


def load_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render_kustomization(directory: Path) -> list[dict]:
    """``kubectl kustomize DIRECTORY`` (offline) parsed into documents."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl (with its built-in kustomize) is needed to render deploy/k8s overlays")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pytorchjobs(documents: list[dict]) -> Iterator[dict]:
    return (d for d in documents if d.get("kind") == "PyTorchJob")


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<root>"


def validate_pytorchjob(job: dict) -> list[str]:
    """Every problem found, each naming the field; empty when valid."""
    problems = []
    if job.get("apiVersion") != "kubeflow.org/v1":
        problems.append(f"apiVersion: {job.get('apiVersion')!r} is not 'kubeflow.org/v1'")
    for error in sorted(_validator().iter_errors(job), key=lambda e: list(e.absolute_path)):
        problems.append(f"{_where(error)}: {error.message}")
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    elastic = spec.get("elasticPolicy")

    # Admission-webhook rules of training-operator v1.9.x.
    for kind, replica in replicas.items():
        if kind not in ("Master", "Worker"):
            problems.append(f"spec.pytorchReplicaSpecs.{kind}: replica type must be Master or Worker")
        if kind == "Master" and replica.get("replicas", 1) != 1:
            problems.append(f"spec.pytorchReplicaSpecs.Master.replicas: must be 1, not {replica.get('replicas')}")
        containers = (((replica.get("template") or {}).get("spec") or {}).get("containers")) or []
        for i, container in enumerate(containers):
            if not container.get("image"):
                problems.append(f"spec.pytorchReplicaSpecs.{kind}.template.spec.containers.{i}.image: required")
        if not any(c.get("name") == "pytorch" for c in containers):
            problems.append(f"spec.pytorchReplicaSpecs.{kind}.template.spec.containers: one container must be named 'pytorch'")
    if elastic is not None:
        if "Worker" not in replicas:
            problems.append("spec.pytorchReplicaSpecs.Worker: required when elasticPolicy is set")
        if elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            problems.append("spec.elasticPolicy.nProcPerNode: must not be set together with spec.nprocPerNode")

    # This project's rules for an elastic hierarchical-SGD job.
    if elastic is None:
        problems.append("spec.elasticPolicy: required (this job is elastic)")
    else:
        if elastic.get("rdzvBackend") != "c10d":
            problems.append(f"spec.elasticPolicy.rdzvBackend: {elastic.get('rdzvBackend')!r} is not 'c10d'")
        low, high = elastic.get("minReplicas"), elastic.get("maxReplicas")
        if low is None or high is None:
            problems.append("spec.elasticPolicy.minReplicas/maxReplicas: both required")
        elif isinstance(low, int) and isinstance(high, int) and low > high:
            problems.append(f"spec.elasticPolicy.minReplicas: {low} is greater than maxReplicas {high}")
    for kind, replica in replicas.items():
        for i, container in enumerate((((replica.get("template") or {}).get("spec") or {}).get("containers")) or []):
            base = f"spec.pytorchReplicaSpecs.{kind}.template.spec.containers.{i}"
            env = container.get("env") or []
            for j, var in enumerate(env):
                if "value" in var and SECRETISH.search(str(var.get("name", ""))):
                    problems.append(f"{base}.env.{j}.value: {var['name']} is inline; use valueFrom.secretKeyRef")
            if container.get("name") == "pytorch":
                if not any(v.get("name") == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" and v.get("value") == "1" for v in env):
                    problems.append(f"{base}.env: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is required (torch 2.13 cannot restart workers without it)")
                if (container.get("command") or [None])[0] != "torchrun":
                    problems.append(f"{base}.command: must be a plain torchrun (the operator injects PET_* settings)")
    return problems


def pytorch_container(job: dict) -> dict:
    containers = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "pytorch")


def mutated(job: dict, fn) -> dict:
    broken = copy.deepcopy(job)
    fn(broken)
    return broken
