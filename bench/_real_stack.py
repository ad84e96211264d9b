"""The real control plane for operator_scale: KubeStack (etcd, kube-apiserver,
controller-manager, scheduler, the real KubeRay) with the API server's audit log on for the two
operators' users, both operators' ServiceAccounts bound to the chart's ClusterRole, and a fake
node pool large enough that the scheduler binds every pod KubeRay makes.

No kubelet runs (finetune_testbed.nodes: nodes that register, report Ready and renew their
Leases); pods stay Pending once bound. The process kubelet and the pod network are not used:
they are one per machine, and this bench shares the machine with the realkube tests.
"""
from __future__ import annotations

import asyncio
import math
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench._audit import AuditCounter, policy
from finetune_testbed.chart_install import Release, install_rbac, render_release
from finetune_testbed.kubestack import KubeStack, bin_dir
from finetune_testbed.nodes import NodeAgent, cpu_node, gpu_node

RELEASE, RELEASE_NS = "ftbench", "ftbench-system"
FLOOR_NS, FLOOR_SA = "bench-floor", "floor-operator"
GPU_NODES = CPU_NODES = 4


def sa_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


class BenchNodeAgent(NodeAgent):
    """The test bed's nodes, less the kubelet's confirmation of deleted pods: NodeAgent lists
    each node's pods every second for that, which with thousands of pods bound would cost
    the API server more than the operators under test. The bench force-deletes a run's pods
    itself when it removes the run's namespace (`RealStack.delete_namespace`)."""

    def _finish_deletions(self, name: str, req) -> None:
        return None


@dataclass
class Identity:
    username: str
    token: str
    kubeconfig: Path


class RealStack:
    def __init__(self, max_jobs: int, workers_per_job: int,
                 floor_pods_per_job: int) -> None:
        self.release: Release = render_release({"rbac": {"mode": "cluster"}}, name=RELEASE,
                                               namespace=RELEASE_NS)
        users = {sa_user(RELEASE_NS, self.release.service_account): "ours",
                 sa_user(FLOOR_NS, FLOOR_SA): "floor"}
        t0 = time.monotonic()
        # Its own temporary workdir (KUBESTACK_KEEP=1 keeps it: the components' logs and the
        # audit log).
        self.stack = KubeStack.start(bin_dir(), audit_policy=policy(list(users)))
        self.started_s = time.monotonic() - t0
        self.audit = AuditCounter(self.stack.audit_log, users)
        self.identities: dict[str, Identity] = {}
        self._install_operators(users)
        self.agent = BenchNodeAgent(self.stack).start()
        self._add_nodes(max_jobs, workers_per_job, floor_pods_per_job)

    def _install_operators(self, users: dict[str, str]) -> None:
        """Ours: the chart's ServiceAccount, ClusterRole and binding as Helm renders them.
        The floor: its own ServiceAccount bound to the same ClusterRole (the same grants)."""
        install_rbac(self.stack, self.release)
        role = self.release.of_kind("ClusterRole")[0]["metadata"]["name"]
        self.stack.apply([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": FLOOR_NS}},
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": FLOOR_SA, "namespace": FLOOR_NS}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": f"{FLOOR_SA}-bench"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": role},
             "subjects": [{"kind": "ServiceAccount", "name": FLOOR_SA, "namespace": FLOOR_NS}]},
        ])
        for ns, sa, who in ((RELEASE_NS, self.release.service_account, "ours"),
                            (FLOOR_NS, FLOOR_SA, "floor")):
            token = self.stack.service_account_token(ns, sa)
            self.identities[who] = Identity(sa_user(ns, sa), token,
                                            self.stack.token_kubeconfig(f"bench-{who}", token))

    def _add_nodes(self, max_jobs: int, workers_per_job: int, floor_pods_per_job: int) -> None:
        """GPU nodes (tainted nvidia.com/gpu) for ours' workers, untainted CPU nodes for ours'
        heads and every floor pod (the floor's RayCluster selects nothing and tolerates
        nothing); each pool sized for the largest run with half again to spare, so no pod
        waits for room. The jobs' workers ask for 1 GPU, 4 CPUs, 32Gi each; heads 1 CPU, 4Gi."""
        suffix = uuid.uuid4().hex[:4]
        per_gpu_node = math.ceil(max_jobs * workers_per_job * 1.5 / GPU_NODES) + 10
        per_cpu_node = math.ceil(max_jobs * max(1, floor_pods_per_job) * 1.5 / CPU_NODES) + 10
        for i in range(GPU_NODES):
            spec = gpu_node(f"gpu-{suffix}-{i}", "a100", gpus=per_gpu_node,
                            cpu=str(per_gpu_node * 4), memory=f"{per_gpu_node * 32}Gi")
            spec.capacity["pods"] = str(per_gpu_node)
            self.agent.add(spec)
        for i in range(CPU_NODES):
            spec = cpu_node(f"cpu-{suffix}-{i}", cpu=str(per_cpu_node),
                            memory=f"{per_cpu_node * 4}Gi")
            spec.capacity["pods"] = str(per_cpu_node)
            self.agent.add(spec)
        deadline = time.monotonic() + 120
        # TaintNodesByCondition marks a new node not-ready until the node lifecycle
        # controller sees it Ready (tests/realkube/conftest.py waits the same way).
        while time.monotonic() < deadline:
            if all(not any(t["key"].startswith("node.kubernetes.io/")
                           for t in self.stack.get("node", name)["spec"].get("taints") or [])
                   for name in self.agent.nodes):
                return
            time.sleep(1)
        raise RuntimeError("the fake nodes did not become Ready in 120 s")

    # -- clients

    def ssl_context(self) -> ssl.SSLContext:
        w = self.stack.workdir
        ctx = ssl.create_default_context(cafile=str(w / "ca.crt"))
        ctx.load_cert_chain(w / "admin.crt", w / "admin.key")
        return ctx

    def admin_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(self.stack.server, connector=aiohttp.TCPConnector(
            limit=0, ssl=self.ssl_context()))

    def component_pids(self) -> dict[str, int]:
        return {name: c.proc.pid for name, c in self.stack.components.items()}

    # -- between runs

    async def delete_namespace(self, ns: str, timeout: float = 300.0) -> float:
        """Remove a run's namespace and wait until it is gone (so its clean-up does not load
        the next run). The operator is stopped by then, so the jobs' finalizers are removed
        here; no kubelet confirms pod deletions, so pods are deleted with grace period 0.
        Returns the seconds it took."""
        t0 = time.monotonic()
        async with self.admin_session() as s:
            async with s.delete(f"/api/v1/namespaces/{ns}") as r:
                await r.read()
            jobs_path = f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"
            sem = asyncio.Semaphore(32)

            async def unfinalize(name: str) -> None:
                async with sem:
                    async with s.patch(f"{jobs_path}/{name}",
                                       json={"metadata": {"finalizers": None}},
                                       headers={"Content-Type": "application/merge-patch+json"}) as r:
                        await r.read()

            while time.monotonic() - t0 < timeout:
                async with s.get(jobs_path) as r:
                    jobs = (await r.json()).get("items", []) if r.status == 200 else []
                await asyncio.gather(*(unfinalize(j["metadata"]["name"]) for j in jobs
                                       if j["metadata"].get("finalizers")))
                async with s.delete(f"/api/v1/namespaces/{ns}/pods",
                                    json={"kind": "DeleteOptions", "apiVersion": "v1",
                                          "gracePeriodSeconds": 0}) as r:
                    await r.read()
                async with s.get(f"/api/v1/namespaces/{ns}") as r:
                    if r.status == 404:
                        return time.monotonic() - t0
                await asyncio.sleep(3)
        raise RuntimeError(f"namespace {ns} not gone after {timeout:.0f} s")

    async def create_namespace(self, ns: str) -> None:
        async with self.admin_session() as s:
            async with s.post("/api/v1/namespaces", json={
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}) as r:
                if r.status != 201:
                    raise RuntimeError(f"namespace {ns}: {r.status} {await r.text()}")

    def stop(self) -> None:
        self.agent.stop()
        self.stack.stop()

    def node_errors(self) -> list[str]:
        return list(self.agent.errors)


def env_for_ours(release: Release, kubeconfig: Path) -> dict[str, Any]:
    """The operator container's environment as the chart's Deployment sets it, with the
    ServiceAccount's token in a kubeconfig (chart_install.start_operator's way, less the pod
    network)."""
    return {**release.container_env(), "KUBECONFIG": str(kubeconfig),
            "POD_ID": f"{release.name}-operator-0"}
