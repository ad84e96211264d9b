"""Nodes that look like a GPU node pool, kept Ready the way kubelets keep theirs.

Each node is its own client (`system:node:<name>` in `system:nodes`, a certificate from the
run's CA), so the API server's Node authorizer and NodeRestriction admission judge what it
does, as they judge a kubelet: it registers its own Node object (labels, taints, capacity
including `nvidia.com/gpu`), reports its status conditions, and renews its Lease in
`kube-node-lease` every few seconds, which is what kube-controller-manager's node lifecycle
controller watches to keep it Ready.

No containers run here: the scheduler binds pods to these nodes and they stay Pending (a
deleted one goes at once, its node confirming the deletion as a kubelet does), unless
a test writes, as the pod's node, the states a kubelet would report (`PodReports`) to see
how KubeRay reads them. finetune_testbed.kubelet's `ProcessKubelet` is this agent with the
pods' containers really run.
"""

from __future__ import annotations

import datetime
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from .kubestack import KubeStack, StackError

# The GPU pool's label value (finetune.dev/pool) on the session's node pool (conftest).
GPU_POOL = "a100"
LEASE_SECONDS = 40
RENEW_EVERY = 5.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now_s() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class NodeSpec:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)
    capacity: dict[str, str] = field(default_factory=dict)


def gpu_node(name: str, pool: str, gpus: int = 8, cpu: str = "96",
             memory: str = "1100Gi") -> NodeSpec:
    """A node of a GPU pool as the clouds label and taint them (the NVIDIA GPU operator's
    labels, the device plugin's resource, the `nvidia.com/gpu` NoSchedule taint)."""
    return NodeSpec(
        name=name,
        labels={"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "p4d.24xlarge",
                "finetune.dev/pool": pool,
                "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "A100-SXM4-40GB",
                "nvidia.com/gpu.count": str(gpus)},
        taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        capacity={"cpu": cpu, "memory": memory, "pods": "110",
                  "ephemeral-storage": "500Gi", "nvidia.com/gpu": str(gpus)})


def cpu_node(name: str, pool: str = "cpu", cpu: str = "16", memory: str = "64Gi") -> NodeSpec:
    return NodeSpec(
        name=name,
        labels={"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "finetune.dev/pool": pool},
        capacity={"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "100Gi"})


class NodeAgent:
    """Registers nodes and heartbeats for them (one thread for all) until `stop()`."""

    def __init__(self, stack: KubeStack):
        self.stack = stack
        self.nodes: dict[str, NodeSpec] = {}
        self._kubeconfigs: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-agent", daemon=True)
        self.errors: list[str] = []
        # The nodes' InternalIP (status.addresses; pods' hostIP under the process kubelet).
        self.node_ip = "127.0.0.1"

    def start(self) -> "NodeAgent":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _as_node(self, name: str):
        """A request function authenticated as the node's own identity."""
        if name not in self._kubeconfigs:
            cert, key = self.stack.ca.issue(f"system:node:{name}", ("system:nodes",))
            cert_path = self.stack.workdir / f"node-{name}.crt"
            key_path = self.stack.workdir / f"node-{name}.key"
            cert_path.write_bytes(cert)
            key_path.write_bytes(key)
            key_path.chmod(0o600)
            self._kubeconfigs[name] = (cert_path, key_path)
        cert_path, key_path = self._kubeconfigs[name]

        def request(method: str, path: str, body: Any = None,
                    content_type: str = "application/json"):
            return self.stack.request(method, path, body, client_cert=(cert_path, key_path),
                                      content_type=content_type)
        return request

    def add(self, spec: NodeSpec) -> None:
        """Register the node as its kubelet would, and report it Ready."""
        req = self._as_node(spec.name)
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": spec.name, "labels": spec.labels},
                "spec": {"taints": spec.taints}}
        status, body = req("POST", "/api/v1/nodes", node)
        if status not in (201, 409):
            raise StackError(f"registering node {spec.name}: {status} {body.get('message')}")
        self._report_status(spec, req)
        self._renew_lease(spec, req)
        self.nodes[spec.name] = spec

    def remove(self, name: str) -> None:
        self.nodes.pop(name, None)
        self.stack.request("DELETE", f"/api/v1/nodes/{name}")

    def _report_status(self, spec: NodeSpec, req) -> None:
        now = _now_s()
        conditions = [
            {"type": t, "status": "False", "reason": r, "message": m,
             "lastHeartbeatTime": now, "lastTransitionTime": now}
            for t, r, m in (
                ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
                ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID"))]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "kubelet is posting ready status",
                           "lastHeartbeatTime": now, "lastTransitionTime": now})
        patch = {"status": {
            "capacity": spec.capacity, "allocatable": spec.capacity,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": self.node_ip},
                          {"type": "Hostname", "address": spec.name}],
            "nodeInfo": {"kubeletVersion": "v1.37.2", "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "kubestack://0", "osImage": "kubestack",
                         "kernelVersion": "", "machineID": spec.name, "systemUUID": spec.name,
                         "bootID": spec.name},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}}
        status, body = req("PATCH", f"/api/v1/nodes/{spec.name}/status", patch,
                           content_type="application/strategic-merge-patch+json")
        if status != 200:
            raise StackError(f"node {spec.name} status: {status} {body.get('message')}")

    def _renew_lease(self, spec: NodeSpec, req) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{spec.name}"
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": spec.name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": spec.name, "leaseDurationSeconds": LEASE_SECONDS,
                          "renewTime": _now()}}
        status, body = req("PATCH", path, {"spec": lease["spec"]},
                           content_type="application/merge-patch+json")
        if status == 404:
            status, body = req("POST", path.rsplit("/", 1)[0], lease)
        if status not in (200, 201):
            raise StackError(f"node {spec.name} lease: {status} {body.get('message')}")

    def _finish_deletions(self, name: str, req) -> None:
        """A pod bound to a node is only gone once its kubelet confirms it stopped the pod's
        containers. None run here, so the node confirms at once, as the kubelet does once
        they stopped (a delete with grace period 0, conditional on the pod's uid)."""
        status, body = req("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{name}")
        if status != 200:
            raise StackError(f"node {name} listing its pods: {status} {body.get('message')}")
        for pod in body.get("items", []):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                req("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                    {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                     "preconditions": {"uid": meta["uid"]}})

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(1.0):
            tick += 1
            for spec in list(self.nodes.values()):
                req = self._as_node(spec.name)
                try:
                    self._finish_deletions(spec.name, req)
                    if tick % int(RENEW_EVERY) == 0:
                        self._renew_lease(spec, req)
                    if tick % 30 == 0:  # kubelets report status every ~30 s to a minute
                        self._report_status(spec, req)
                except Exception as exc:  # keep beating for the other nodes
                    self.errors.append(f"{spec.name}: {exc}")

def _container_status(container: dict[str, Any], state: dict[str, Any], *, ready: bool,
                      restarts: int = 0, last: dict[str, Any] | None = None) -> dict[str, Any]:
    status = {"name": container["name"], "image": container["image"],
              "imageID": f"kubestack://{container['image']}",
              "containerID": f"kubestack://{uuid.uuid4().hex}", "ready": ready,
              "started": "running" in state, "restartCount": restarts, "state": state}
    if last:
        status["lastState"] = last
    return status


class PodReports:
    """What the kubelet of a pod's node writes into the pod's status, written as that node
    (NodeRestriction lets a node write only the status of pods bound to it). For tests of
    how KubeRay and the operator read pod states; no container runs."""

    def __init__(self, agent: NodeAgent):
        self.agent = agent

    def _patch(self, pod: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        node = pod["spec"]["nodeName"]
        meta = pod["metadata"]
        code, body = self.agent._as_node(node)(
            "PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
            {"status": status}, content_type="application/strategic-merge-patch+json")
        if code != 200:
            raise StackError(f"pod {meta['name']} status as {node}: {code} "
                             f"{body.get('message')}")
        return body

    def running(self, pod: dict[str, Any], ip: str) -> dict[str, Any]:
        """Init containers done, every container running and ready."""
        now = _now_s()
        spec = pod["spec"]
        return self._patch(pod, {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": now,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                           for t in ("Initialized", "ContainersReady", "Ready")],
            "initContainerStatuses": [
                _container_status(c, {"terminated": {"exitCode": 0, "reason": "Completed",
                                                     "startedAt": now, "finishedAt": now}},
                                  ready=True) for c in spec.get("initContainers", [])],
            "containerStatuses": [
                _container_status(c, {"running": {"startedAt": now}}, ready=True)
                for c in spec["containers"]]})

    def container_killed(self, pod: dict[str, Any], restarts: int = 1) -> dict[str, Any]:
        """The first container OOM-killed (exit 137); restartPolicy Always, so the kubelet
        holds it in back-off before the restart: the pod stays Running, not Ready."""
        now = _now_s()
        spec = pod["spec"]
        statuses = [_container_status(
            c, {"waiting": {"reason": "CrashLoopBackOff",
                            "message": "back-off 10s restarting failed container"}},
            ready=False, restarts=restarts,
            last={"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": now,
                                 "finishedAt": now}})
            if i == 0 else _container_status(c, {"running": {"startedAt": now}}, ready=True)
            for i, c in enumerate(spec["containers"])]
        return self._patch(pod, {
            "conditions": [{"type": t, "status": "False", "reason": "ContainersNotReady",
                            "lastTransitionTime": now} for t in ("ContainersReady", "Ready")],
            "containerStatuses": statuses})

    def evicted(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The kubelet evicted the pod (node memory pressure): phase Failed, reason Evicted."""
        now = _now_s()
        return self._patch(pod, {
            "phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory.",
            "conditions": [{"type": t, "status": "False", "reason": "PodFailed",
                            "lastTransitionTime": now} for t in ("ContainersReady", "Ready")],
            "containerStatuses": [_container_status(
                c, {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": now,
                                   "finishedAt": now}}, ready=False)
                for c in pod["spec"]["containers"]]})
