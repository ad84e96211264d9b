"""How often a pass reads a not-ready RayCluster's pods and Events (Reconciler.observe_blocked):
every reconcile interval while they show it blocked, less and less often while they do not."""
from __future__ import annotations

import asyncio

from finetune_api.status import Reason
from finetune_operator import reconcile
from finetune_operator.reconcile import JobMemory, Reconciler, World
from finetune_operator.settings import Settings

UNSCHEDULABLE = {"metadata": {"name": "w-0"}, "status": {"conditions": [
    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
     "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]}}
BOUND = {"metadata": {"name": "h-0"}, "status": {"conditions": [
    {"type": "PodScheduled", "status": "True"}]}}


class Pods:
    """list_pods/list_events of a KubeClient: what the cluster's pods are now; counts reads."""

    def __init__(self, pods):
        self.pods, self.reads = pods, 0

    async def list_pods(self, namespace, selector):
        self.reads += 1
        return self.pods

    async def list_events(self, namespace, selector):
        self.reads += 1
        return []


def world(uid="u1"):
    cluster = {"metadata": {"name": "j", "namespace": "ns", "uid": uid,
                            "creationTimestamp": "2020-01-01T00:00:00Z"},
               "status": {"conditions": [{"type": "HeadPodReady", "status": "False"}]}}
    return World(body={"metadata": {"name": "j", "namespace": "ns"}}, status={}, job=None,
                 cluster_name="j", cluster=cluster)


def passes(kube, mem, times, clock, uid="u1"):
    reconciler = Reconciler(Settings(), kube, http=None)  # type: ignore[arg-type]
    found = []
    for t in times:
        clock[0] = t
        found.append(asyncio.run(reconciler.observe_blocked(world(uid), mem)))
    return found


def test_a_cluster_whose_pods_are_fine_is_looked_at_less_and_less(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(reconcile.time, "monotonic", lambda: clock[0])
    kube, mem = Pods([BOUND]), JobMemory()
    # Passes every 10 s for 3 minutes: looks at 0, 20 (15 s on), 50 (30 s on), 110, 170.
    passes(kube, mem, [10.0 * i for i in range(19)], clock)
    assert kube.reads == 5
    assert mem.blocked_gap == reconcile.BLOCKED_MAX_GAP


def test_a_blocked_cluster_is_looked_at_every_pass_and_a_new_cluster_starts_afresh(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(reconcile.time, "monotonic", lambda: clock[0])
    kube, mem = Pods([BOUND, UNSCHEDULABLE]), JobMemory()
    found = passes(kube, mem, [0.0, 10.0, 20.0], clock)
    assert kube.reads == 3 and all(f[0] == Reason.UNSCHEDULABLE for f in found)
    # Scheduled now: the looks back off; a recreated cluster (new uid) is looked at at once.
    kube.pods = [BOUND]
    passes(kube, mem, [30.0, 40.0], clock)
    assert kube.reads == 4
    passes(kube, mem, [41.0], clock, uid="u2")
    assert kube.reads == 5
