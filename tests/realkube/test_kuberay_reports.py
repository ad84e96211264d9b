"""What the real KubeRay reports on a RayCluster when its head pod is lost.

The operator's lost-cluster path must read what KubeRay writes, not what one expects it to
write. Here the pods' node (finetune_testbed.nodes, authenticated as that node) reports the
states a kubelet reports: every container running and ready; then the head's Ray container
OOM-killed (restartPolicy Always: the kubelet restarts it in place); then the head pod
evicted (phase Failed). These tests pin KubeRay's answers (docs/install.md lists them):

* all pods ready: `state: ready`, conditions `HeadPodReady` and `RayClusterProvisioned` True;
* head container killed: `HeadPodReady` False, `state` stays `ready`, the pod is kept;
* head pod Failed: KubeRay deletes it and creates a new head pod; `state` is still never
  `failed` (KubeRay >= 1.2 does not write it).
"""

from __future__ import annotations

import uuid

import pytest

from finetune_testbed.nodes import PodReports
from .clusters import bound_pods, create_job_cluster, pods_of
from .waiting import wait_for

pytestmark = pytest.mark.realkube


def _condition(cluster: dict, kind: str) -> dict:
    return next((c for c in cluster.get("status", {}).get("conditions", [])
                 if c["type"] == kind), {})


def _head(stack, ns: str, name: str) -> dict | None:
    return next((p for p in pods_of(stack, ns, name)
                 if p["metadata"]["labels"]["ray.io/node-type"] == "head"
                 and not p["metadata"].get("deletionTimestamp")), None)


def test_what_kuberay_reports_when_the_head_pod_is_lost(kubestack, node_pool):
    agent, _ = node_pool
    reports = PodReports(agent)
    ns = f"head-{uuid.uuid4().hex[:5]}"
    create_job_cluster(kubestack, ns, "headloss", **{"spec.resources.workers": 1,
                                                  "spec.resources.gpusPerWorker": 1})
    pods = bound_pods(kubestack, ns, "headloss", 2)
    for i, pod in enumerate(pods):
        reports.running(pod, f"127.0.1.{i + 1}")

    def cluster() -> dict:
        return kubestack.get("raycluster", "-n", ns, "headloss")
    ready = wait_for("KubeRay to report the cluster ready",
                     lambda: (lambda c: c if c.get("status", {}).get("state") == "ready"
                              and _condition(c, "HeadPodReady").get("status") == "True"
                              else None)(cluster()))
    assert _condition(ready, "RayClusterProvisioned")["status"] == "True"
    head = _head(kubestack, ns, "headloss")
    assert head["spec"].get("restartPolicy", "Always") == "Always"

    # The head's Ray process is OOM-killed; the kubelet restarts it in the same pod.
    reports.container_killed(head)
    after_kill = wait_for("KubeRay to see the head not ready",
                          lambda: (lambda c: c if _condition(c, "HeadPodReady")
                                   .get("status") == "False" else None)(cluster()))
    assert after_kill["status"]["state"] == "ready"
    assert _head(kubestack, ns, "headloss")["metadata"]["uid"] == head["metadata"]["uid"]

    # The head pod is evicted: a terminal phase, so KubeRay replaces the pod.
    reports.evicted(_head(kubestack, ns, "headloss"))
    new_head = wait_for("KubeRay to create a new head pod",
                        lambda: (lambda h: h if h and h["metadata"]["uid"]
                                 != head["metadata"]["uid"] else None)(
                            _head(kubestack, ns, "headloss")))
    assert new_head["metadata"]["name"] != head["metadata"]["name"]
    final = cluster()
    assert final["status"].get("state") != "failed"
    assert _condition(final, "HeadPodReady").get("status") == "False"


def test_kuberay_refuses_a_cluster_name_with_a_leading_digit_in_an_event_only(kubestack):
    """Why job names start with a letter (the CRD's rule, tests/api/cases.py): KubeRay's
    ValidateRayClusterMetadata refuses a RayCluster name that is not a DNS-1035 label. It
    writes no status and no token Secret, only an Event, which the operator reads
    (observe.refusal) for a cluster that never gets a condition."""
    from finetune_operator.observe import refusal

    ns = f"digit-{uuid.uuid4().hex[:5]}"
    kubestack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    body = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": "1abc", "namespace": ns},
            "spec": {"rayVersion": "2.60.0", "authOptions": {"mode": "token"},
                     "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {
                         "containers": [{"name": "ray-head", "image": "ray"}]}}}}}
    status, created = kubestack.request("POST", f"/apis/ray.io/v1/namespaces/{ns}/rayclusters",
                                        body)
    assert status == 201, created.get("message")

    def refused():
        events = kubestack.get("events", "-n", ns)["items"]
        return refusal(events, created["metadata"]["uid"])
    words = wait_for("KubeRay's Event refusing the cluster", refused)
    assert words.startswith("InvalidRayClusterMetadata:") and "DNS1035" in words, words
    cluster = kubestack.get("raycluster", "-n", ns, "1abc")
    assert not (cluster.get("status") or {}).get("conditions")
    assert kubestack.request("GET", f"/api/v1/namespaces/{ns}/secrets/rabc")[0] == 404
    assert kubestack.request("GET", f"/api/v1/namespaces/{ns}/secrets/1abc")[0] == 404
