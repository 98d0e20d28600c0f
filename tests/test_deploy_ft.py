"""deploy/ft: a lighthouse and one elastic PyTorchJob per replica group, rendered by kustomize and checked offline."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s_validation import pytorch_container, pytorchjobs, validate_pytorchjob

ROOT = Path(__file__).resolve().parent.parent
FT = ROOT / "deploy" / "ft"


def _render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _env(container: dict) -> dict[str, dict]:
    return {v["name"]: v for v in container["env"]}


def test_one_valid_elastic_pytorchjob_per_replica_group_and_a_lighthouse():
    docs = _render(FT)
    jobs = list(pytorchjobs(docs))
    assert [j["metadata"]["name"] for j in jobs] == ["digits-ft-group-0", "digits-ft-group-1", "digits-ft-group-2"]
    for job in jobs:
        assert validate_pytorchjob(job) == [], job["metadata"]["name"]
    envs = [_env(pytorch_container(j)) for j in jobs]
    assert [e["REPLICA_GROUP_ID"]["value"] for e in envs] == ["0", "1", "2"]
    for env, job in zip(envs, jobs):
        args = pytorch_container(job)["args"]
        hierarchy = next(a for a in args if a.startswith("--hierarchy="))
        assert hierarchy.endswith(":replicas"), hierarchy  # the example refuses any other top level in this mode
        assert env["ELASTIC_HSGD_FT_HOSTNAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"

    service = next(d for d in docs if d["kind"] == "Service")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    lighthouse = {e["TORCHFT_LIGHTHOUSE"]["value"] for e in envs}
    port = service["spec"]["ports"][0]["port"]
    assert lighthouse == {f"http://{service['metadata']['name']}:{port}"}
    # The Service selects the Deployment's pods and reaches the port the lighthouse binds.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][0] == "torchft_lighthouse"
    bind = next(a for a in container["command"] if a.startswith("--bind="))
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert bind.endswith(f":{named[service['spec']['ports'][0]['targetPort']]}")
    assert any(a.startswith("--min_replicas=") for a in container["command"])
    # Every configMapKeyRef points at a ConfigMap in the same build.
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for env in envs:
        for var in env.values():
            ref = var.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in maps[ref["name"]], ref


def test_a_reordered_env_fails_the_build_instead_of_patching_another_variable(tmp_path):
    copy = tmp_path / "ft"
    shutil.copytree(FT, copy)
    job = copy / "group" / "pytorchjob.yaml"
    text = job.read_text()
    job.write_text(text.replace("                - name: REPLICA_GROUP_ID\n                  value: \"0\"\n", "", 1).replace(
        "                - name: CHECKPOINT_URL\n", "                - name: REPLICA_GROUP_ID\n                  value: \"0\"\n                - name: CHECKPOINT_URL\n", 1
    ))
    with pytest.raises(subprocess.CalledProcessError):
        _render(copy)


def _pod_labels(doc: dict) -> dict:
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    return doc["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    """A NetworkPolicy podSelector (matchLabels only, as deploy/ft writes them) against a pod's labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_heal_secret_is_a_placeholder_secret_mounted_in_every_group():
    from elastic_hsgd.ft.env import HEAL_SECRET_FILE_ENV, check_heal_secret

    docs = _render(FT)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for job in pytorchjobs(docs):
        pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        container = pytorch_container(job)
        env = _env(container)
        assert "ELASTIC_HSGD_HEAL_SECRET" not in env  # never inline: a file from the Secret
        var = env[HEAL_SECRET_FILE_ENV]
        ref = var.get("valueFrom", {}).get("configMapKeyRef")
        path = maps[ref["name"]][ref["key"]] if ref else var["value"]
        mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
        assert mount.get("readOnly") is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        secret = secrets[volume["secret"]["secretName"]]
        key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
        items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])} or {k: k for k in secret.get("stringData", {})}
        value = secret["stringData"][items[key]]
        # The shipped value is a placeholder the code refuses: nobody runs with a known secret.
        with pytest.raises(ValueError, match="placeholder"):
            check_heal_secret(value.encode(), "the Secret")


def test_network_policy_admits_only_the_jobs_pods_to_heal_store_and_lighthouse_ports():
    docs = _render(FT)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policies and all(p["apiVersion"] == "networking.k8s.io/v1" for p in policies)
    members = [*pytorchjobs(docs), next(d for d in docs if d["kind"] == "Deployment")]
    member_labels = [_pod_labels(d) for d in members]
    stranger = {"app": "something-else"}
    for labels, doc in zip(member_labels, members):
        covering = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert covering, f"no NetworkPolicy selects the pods of {doc['metadata']['name']}"
        for policy in covering:
            spec = policy["spec"]
            assert "Ingress" in spec["policyTypes"]
            for rule in spec.get("ingress", []):
                peers = rule.get("from")
                assert peers, f"{policy['metadata']['name']}: an ingress rule without `from` admits everyone"
                for peer in peers:
                    assert set(peer) == {"podSelector"}, peer  # no ipBlock, no other namespaces
                    assert peer["podSelector"].get("matchLabels"), "an empty podSelector admits every pod"
                    assert all(_selects(peer["podSelector"], other) for other in member_labels)
                    assert not _selects(peer["podSelector"], stranger)
    # The groups' heal servers, torchft managers, gloo and TCPStore ports are picked at start
    # (the store at the job port, 23456): the policy over the group pods admits the job's pods on any port.
    group_policy = next(p for p in policies if _selects(p["spec"]["podSelector"], member_labels[0]))
    assert all("ports" not in rule for rule in group_policy["spec"]["ingress"])
