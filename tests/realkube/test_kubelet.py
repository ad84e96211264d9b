"""A RayCluster from the operator's builder really runs: the real KubeRay's pods on the
process kubelet (finetune_testbed.kubelet), real `ray start` processes in a network namespace
per pod, the S3 Secret reaching them through `secretKeyRef`, the head's Ray process
OOM-killed, and a deleted pod's processes stopped.

One Ray cluster (head + one worker, scaled up once the head runs) for all of it: each Ray
node costs about a core for a minute here.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from .clusters import create_job_cluster, pods_of
from .conftest import PROCESS_POOL
from .waiting import wait_for

pytestmark = [pytest.mark.realkube, pytest.mark.timeout(900)]


def _condition(obj: dict, kind: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions", [])
                 if c["type"] == kind), {})


def _pod(stack, ns: str, cluster: str, node_type: str) -> dict | None:
    return next((p for p in pods_of(stack, ns, cluster)
                 if p["metadata"]["labels"]["ray.io/node-type"] == node_type
                 and not p["metadata"].get("deletionTimestamp")), None)


def _container_processes(pid1: int) -> set[int]:
    """Every process in the container's PID namespace (PID 1's), by host pid."""
    target = os.readlink(f"/proc/{pid1}/ns/pid")
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == target:
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _ray_nodes(ip: str, token: str) -> list[dict]:
    """The Ray nodes alive, as the head's dashboard lists them ([] while it is down)."""
    req = urllib.request.Request(f"http://{ip}:8265/nodes?view=summary",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
    except OSError:
        return []
    return [n["raylet"] for n in body["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]


def test_a_raycluster_runs_on_the_process_kubelet(kubestack, kubelet):
    network = kubelet.network
    ns = f"run-{uuid.uuid4().hex[:5]}"
    name = "proc"
    def no_workers_yet(cluster: dict) -> None:
        # The worker group starts empty and is scaled up once the head runs: two Ray nodes
        # starting at once on 2 shared cores is what this test need not measure.
        group = cluster["spec"]["workerGroupSpecs"][0]
        group["replicas"] = group["minReplicas"] = 0
    create_job_cluster(kubestack, ns, name, edit=no_workers_yet, **{
        "spec.resources.workers": 1, "spec.resources.gpusPerWorker": 0,
        "spec.resources.cpusPerWorker": 1, "spec.resources.memoryPerWorker": "2Gi",
        "spec.resources.nodeSelector": {"finetune.dev/pool": PROCESS_POOL}})

    # The job's S3 Secret does not exist yet: the kubelet holds the containers, as a kubelet
    # does, in CreateContainerConfigError.
    def waiting_reason() -> str | None:
        head = _pod(kubestack, ns, name, "head")
        for st in ((head or {}).get("status") or {}).get("containerStatuses", []):
            return (st["state"].get("waiting") or {}).get("reason")
        return None
    wait_for("the head to wait for its Secret",
             lambda: waiting_reason() == "CreateContainerConfigError", timeout=120)
    secret_value = secrets.token_hex(16)
    kubestack.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "s3-credentials", "namespace": ns}, "type": "Opaque", "data": {
        "AWS_ACCESS_KEY_ID": base64.b64encode(b"AKIDPROCESS").decode(),
        "AWS_SECRET_ACCESS_KEY": base64.b64encode(secret_value.encode()).decode()}})

    def cluster() -> dict:
        return kubestack.get("raycluster", "-n", ns, name)
    ready = wait_for("KubeRay to report the cluster ready (real probes of real Ray)",
                     lambda: (lambda c: c if c.get("status", {}).get("state") == "ready"
                              and _condition(c, "HeadPodReady").get("status") == "True"
                              else None)(cluster()), timeout=420, interval=1)
    assert _condition(ready, "RayClusterProvisioned")["status"] == "True"
    kubestack.request("PATCH", f"/apis/ray.io/v1/namespaces/{ns}/rayclusters/{name}",
                      {"spec": {"workerGroupSpecs": [{
                          **ready["spec"]["workerGroupSpecs"][0], "replicas": 1,
                          "minReplicas": 1}]}},
                      content_type="application/merge-patch+json")
    wait_for("KubeRay's scaled-up worker to be ready", lambda: (
        lambda p: p if p and _condition(p, "Ready").get("status") == "True" else None)(
        _pod(kubestack, ns, name, "worker")), timeout=420, interval=1)
    head, worker = _pod(kubestack, ns, name, "head"), _pod(kubestack, ns, name, "worker")
    subnet = network.subnet
    for pod in (head, worker):
        st = pod["status"]
        assert st["phase"] == "Running" and _condition(pod, "Ready")["status"] == "True"
        assert ipaddress.ip_address(st["podIP"]) in subnet
        assert st["hostIP"] == network.gateway
    assert head["status"]["podIP"] != worker["status"]["podIP"]
    # The worker's init container waited for the head's GCS at the head Service's name.
    init = worker["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["reason"] == "Completed", init
    # What the operator dials: the head's address as KubeRay publishes it.
    assert ready["status"]["head"]["podIP"] == head["status"]["podIP"]

    # Head and worker are one Ray cluster, each at its own pod address, with KubeRay's token.
    token_secret = kubestack.get("secret", "-n", ns, name)
    token = base64.b64decode(token_secret["data"]["auth_token"]).decode()
    alive = wait_for("both Ray nodes alive", lambda: (lambda n: n if len(n) == 2 else None)(
        _ray_nodes(head["status"]["podIP"], token)), timeout=60)
    assert {n["nodeManagerAddress"] for n in alive} == {head["status"]["podIP"],
                                                         worker["status"]["podIP"]}

    # The Secret reached the containers' environment, never a process's arguments.
    worker_run = kubelet.worker(ns, worker["metadata"]["name"])
    worker_pid1 = worker_run.main[0].pid1
    environ = Path(f"/proc/{worker_pid1}/environ").read_bytes().split(b"\0")
    assert f"AWS_SECRET_ACCESS_KEY={secret_value}".encode() in environ
    for pid in _container_processes(worker_pid1):
        assert secret_value.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

    # The head's Ray container is OOM-killed (the kernel's OOM killer modelled: SIGKILL to
    # the container's PID 1). The kubelet restarts it in the same pod.
    head_processes = _container_processes(kubelet.worker(ns, head["metadata"]["name"])
                                          .main[0].pid1)
    kubelet.oom_kill(ns, head["metadata"]["name"], "ray-head")
    killed = wait_for("the head's container to show the OOM kill", lambda: (
        lambda p: p if p and p["status"]["containerStatuses"][0].get("restartCount") == 1
        else None)(_pod(kubestack, ns, name, "head")), timeout=60)
    last = killed["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (137, "OOMKilled")
    assert killed["metadata"]["uid"] == head["metadata"]["uid"]
    assert not any(Path(f"/proc/{p}").exists() for p in head_processes)
    not_ready = wait_for("KubeRay to see the head not ready", lambda: (
        lambda c: c if _condition(c, "HeadPodReady").get("status") == "False" else None)(
        cluster()), timeout=60)
    assert not_ready["status"]["state"] == "ready"
    # The restarted head is a new Ray cluster; the worker's raylet lost its GCS.
    back = wait_for("the restarted head to be ready again", lambda: (
        lambda c: c if _condition(c, "HeadPodReady").get("status") == "True" else None)(
        cluster()), timeout=300, interval=1)
    assert back["status"].get("state") != "failed"
    # The restarted head is a new Ray cluster (no GCS fault tolerance): the worker's raylet
    # lost its GCS; the worker rejoins once its own container restarts.
    rejoined = wait_for("the worker to rejoin the restarted head", lambda: (
        lambda n: n if len(n) == 2 else None)(_ray_nodes(head["status"]["podIP"], token)),
        timeout=300, interval=2)
    worker_after = _pod(kubestack, ns, name, "worker")
    print("after the head's OOM kill: worker pod kept:",
          worker_after["metadata"]["uid"] == worker["metadata"]["uid"], "worker restarts:",
          worker_after["status"]["containerStatuses"][0]["restartCount"], "nodes:",
          [n["nodeManagerAddress"] for n in rejoined])

    # Deleting a pod stops its processes: SIGTERM to PID 1, SIGKILL after the grace period,
    # then the pod is gone; KubeRay replaces the worker.
    worker_after = _pod(kubestack, ns, name, "worker")
    run = kubelet.worker(ns, worker_after["metadata"]["name"])
    processes = _container_processes(run.main[0].pid1)
    sandbox = run.sandbox.name
    t0 = time.monotonic()
    kubestack.kubectl("delete", "pod", "-n", ns, worker_after["metadata"]["name"],
                      "--grace-period=3", "--wait=true")
    assert time.monotonic() - t0 < 30
    assert not any(Path(f"/proc/{p}").exists() for p in processes)
    assert sandbox not in network.sandboxes
    assert not Path(f"/run/netns/{sandbox}").exists()
    wait_for("KubeRay to replace the deleted worker", lambda: (
        lambda p: p if p and p["metadata"]["uid"] != worker_after["metadata"]["uid"]
        else None)(_pod(kubestack, ns, name, "worker")), timeout=60)
    kubestack.kubectl("delete", "namespace", ns, "--wait=false")
