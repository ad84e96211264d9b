"""The operator under the faults the real control plane and KubeRay produce without a Ray
process running (issue 11, scenarios 3 and 4, and the lost head as KubeRay reports it; the
scenarios with real training runs in pods need the process kubelet).

The operator runs as `finetune operator` with the chart's ServiceAccount token and exactly the
rules Helm renders (`rbac.mode: cluster`), so a read it lacks a grant for is a 403 here. Jobs:

* `nopool`: workers on a node pool that does not exist; `toobig`: 8 GPUs a worker on a pool
  whose node has 4. Both stay Provisioning with `Ready=False`, reason `Unschedulable`, the
  scheduler's own words in the message, one Event, nothing retried or recreated; when a node
  of `nopool`'s pool joins, its pods are scheduled and the job moves on by itself.
* `noprio`: a priorityClassName that does not exist. The API server refuses KubeRay's pods;
  KubeRay reports `ReplicaFailure`; the job says so (`ClusterRefused`, KubeRay's words) and
  waits, no crash loop, no retry.
* `headloss`: its pods reported running by their node (finetune_testbed.nodes.PodReports), so
  KubeRay reports the cluster ready; then the head's container is OOM-killed: `HeadPodReady`
  False with `state` still `ready`, which the job shows as `HeadNotReady`, no attempt counted.
"""

from __future__ import annotations

import re
import uuid

import pytest

from api.cases import make
from finetune_testbed.chart_install import install_rbac, render_release, start_operator
from finetune_testbed.nodes import GPU_POOL, PodReports, gpu_node

from .clusters import bound_pods, pods_of
from .waiting import wait_for

pytestmark = pytest.mark.realkube

FTJ = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"
S3_SECRET = "s3-credentials"


def _job(ns: str, name: str, **changes) -> dict:
    return make(**{"metadata": {"name": name, "namespace": ns},
                   "spec.resources.workers": 1, "spec.resources.gpusPerWorker": 1,
                   "spec.training.precision": "bf16", **changes})


def _status(stack, ns: str, name: str) -> dict:
    code, body = stack.request("GET", FTJ.format(ns=ns) + f"/{name}")
    assert code == 200, body
    return body.get("status") or {}


def _ready(status: dict) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})


def _waiting_with(stack, ns: str, name: str, reason: str, words: str = "",
                  timeout: float = 90.0) -> dict:
    return wait_for(f"{name} to say {reason} ({words})",
                    lambda: (lambda s: s if _ready(s).get("reason") == reason
                             and words in _ready(s).get("message", "") else None)(
                        _status(stack, ns, name)), timeout=timeout)


def _events(stack, ns: str, name: str, reason: str) -> list[dict]:
    return [e for e in stack.get("events", "-n", ns)["items"]
            if e["involvedObject"].get("kind") == "FineTuneJob"
            and e["involvedObject"]["name"] == name and e["reason"] == reason]


def _cluster_uid(stack, ns: str, name: str) -> str:
    return stack.get("raycluster", "-n", ns, name)["metadata"]["uid"]


def test_jobs_that_cannot_come_up_say_why_and_wait(kubestack, node_pool):
    agent, _ = node_pool
    suffix = uuid.uuid4().hex[:5]
    ns, pool = f"faults-{suffix}", f"h100-{suffix}"
    release = render_release({"operator": {"reconcileInterval": 2, "maxBackoff": 10}},
                             name=f"ft{suffix}", namespace=f"ft-system-{suffix}")
    install_rbac(kubestack, release)
    kubestack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    kubestack.apply({"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": S3_SECRET, "namespace": ns},
                     "stringData": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"}})
    token = kubestack.service_account_token(release.namespace, release.service_account)
    operator = start_operator(kubestack, release, token)
    new_node, small_node = f"{pool}-0", f"small-{suffix}-0"
    agent.add(gpu_node(small_node, f"small-{suffix}", gpus=4))
    try:
        kubestack.apply([
            _job(ns, "nopool", **{"spec.resources.nodeSelector": {"finetune.dev/pool": pool}}),
            _job(ns, "toobig", **{"spec.resources.nodeSelector":
                                  {"finetune.dev/pool": f"small-{suffix}"},
                                  "spec.resources.gpusPerWorker": 8}),
            _job(ns, "noprio", **{"spec.resources.nodeSelector": {"finetune.dev/pool": GPU_POOL},
                                  "spec.resources.priorityClassName": f"missing-{suffix}"}),
            _job(ns, "headloss", **{"spec.resources.nodeSelector":
                                    {"finetune.dev/pool": GPU_POOL}})])

        # Scenario 3: the scheduler's own words, no attempt counted.
        for name, words in (("nopool", "didn't match Pod's node affinity/selector"),
                            ("toobig", "Insufficient nvidia.com/gpu")):
            st = _waiting_with(kubestack, ns, name, "Unschedulable", words)
            assert st["phase"] == "Provisioning" and not st.get("retries"), st
        nopool_uid = _cluster_uid(kubestack, ns, "nopool")

        # Scenario 4: KubeRay cannot create the pods (the API server's Priority admission
        # refuses them); its ReplicaFailure condition reaches the job in KubeRay's words.
        st = _waiting_with(kubestack, ns, "noprio", "ClusterRefused", f"missing-{suffix}")
        assert st["phase"] == "Provisioning" and not st.get("retries"), st
        noprio_uid = _cluster_uid(kubestack, ns, "noprio")

        # The lost head as KubeRay reports it: its pods running, then the head OOM-killed.
        reports = PodReports(agent)
        pods = bound_pods(kubestack, ns, "headloss", 2)
        for i, pod in enumerate(pods):
            reports.running(pod, f"127.0.2.{i + 1}")
        # Ready by KubeRay's report; no Ray runs behind the head's Service, so the dashboard
        # does not answer (the Ready condition says so, nothing is submitted or counted).
        _waiting_with(kubestack, ns, "headloss", "DashboardUnreachable", timeout=120)
        head = next(p for p in pods_of(kubestack, ns, "headloss")
                    if p["metadata"]["labels"]["ray.io/node-type"] == "head")
        reports.container_killed(head)
        st = _waiting_with(kubestack, ns, "headloss", "HeadNotReady", timeout=120)
        assert not st.get("retries"), st
        assert kubestack.get("raycluster", "-n", ns, "headloss")["status"]["state"] == "ready"

        # A node of nopool's pool joins: its workers are placed and the job moves on.
        agent.add(gpu_node(new_node, pool, gpus=8))
        bound_pods(kubestack, ns, "nopool", 2, timeout=120)
        st = _waiting_with(kubestack, ns, "nopool", "ClusterProvisioning", timeout=60)
        assert st["phase"] == "Provisioning" and not st.get("retries"), st

        # Through all of it: one Event per job and reason, the same RayClusters, nothing
        # retried, and the operator still up with no 403.
        for name, reason in (("nopool", "Unschedulable"), ("toobig", "Unschedulable"),
                             ("noprio", "ClusterRefused"), ("headloss", "HeadNotReady")):
            assert len(_events(kubestack, ns, name, reason)) == 1, (name, reason)
        assert _cluster_uid(kubestack, ns, "nopool") == nopool_uid
        assert _cluster_uid(kubestack, ns, "noprio") == noprio_uid
        assert not _status(kubestack, ns, "toobig").get("retries")
        assert operator.proc.poll() is None, operator.text()[-3000:]
    finally:
        operator.stop()
        for node in (new_node, small_node):
            if node in agent.nodes:
                agent.remove(node)
        kubestack.kubectl("delete", "namespace", ns, "--wait=false")
    assert not [line for line in operator.text().splitlines()
                if re.search(r"\b(403|[Ff]orbidden)\b", line)
                and "PriorityClass" not in line], operator.text()[-4000:]
