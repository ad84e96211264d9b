"""KubeRay's pods for the operator's RayCluster, placed by the real kube-scheduler on a node
pool that looks like a cloud GPU pool (finetune_testbed.nodes: tainted, labelled, with
`nvidia.com/gpu` capacity, kept Ready by lease heartbeats).

What is checked is what a platform team relies on: workers land only on the pool the job
names, through its taint, within its GPU capacity; the head (no GPUs) lands outside the GPU
pool; a job that asks for more GPUs than a node has stays Pending with the scheduler's own
reason, and is placed by itself once a node that fits joins. KubeRay gives every Ray
container the cluster's token from the Secret it generated (a secretKeyRef, never a value).
"""

from __future__ import annotations

import uuid

import pytest

from finetune_operator import raycluster

from .clusters import create_job_cluster, pods_of, scheduled_condition
from finetune_testbed.nodes import GPU_POOL, gpu_node
from .waiting import wait_for

pytestmark = pytest.mark.realkube


def test_workers_land_on_the_gpu_pool_within_its_capacity(kubestack, node_pool):
    agent, gpu_nodes = node_pool
    ns = f"sched-{uuid.uuid4().hex[:5]}"
    create_job_cluster(kubestack, ns, "fits", **{"spec.resources.workers": 2,
                                              "spec.resources.gpusPerWorker": 4})

    def all_bound():
        pods = pods_of(kubestack, ns, "fits")
        return pods if len(pods) == 3 and all(p["spec"].get("nodeName") for p in pods) \
            else None
    pods = wait_for("the scheduler to bind the head and both workers", all_bound)
    by_type = {}
    for pod in pods:
        by_type.setdefault(pod["metadata"]["labels"]["ray.io/node-type"], []).append(pod)
    assert len(by_type["worker"]) == 2 and len(by_type["head"]) == 1
    for worker in by_type["worker"]:
        assert worker["spec"]["nodeName"] in gpu_nodes
        limits = worker["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] in (4, "4")
    # No GPU asked, no toleration: the head stays off the tainted pool.
    assert by_type["head"][0]["spec"]["nodeName"] not in gpu_nodes

    # Every Ray container gets the token by reference to the Secret KubeRay generated.
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0].get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("fits", raycluster.AUTH_TOKEN_KEY)
        assert "value" not in env["RAY_AUTH_TOKEN"]
        # The job's S3 credentials travel the same way.
        assert "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]


def test_more_gpus_than_a_node_has_stays_pending_until_a_node_fits(kubestack, node_pool):
    agent, _ = node_pool
    ns = f"sched-{uuid.uuid4().hex[:5]}"
    create_job_cluster(kubestack, ns, "too-big", **{"spec.resources.workers": 1,
                                                 "spec.resources.gpusPerWorker": 16})

    def refused_worker():
        for pod in pods_of(kubestack, ns, "too-big"):
            cond = scheduled_condition(pod)
            if pod["metadata"]["labels"]["ray.io/node-type"] == "worker" \
                    and cond.get("status") == "False":
                return pod, cond
        return None
    worker, cond = wait_for("the scheduler to refuse the 16-GPU worker", refused_worker)
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond["message"]
    assert not worker["spec"].get("nodeName")

    big = f"gpu-big-{uuid.uuid4().hex[:4]}"
    agent.add(gpu_node(big, GPU_POOL, gpus=16))
    wait_for("the scheduler to place the worker on the node that fits",
             lambda: kubestack.get("pod", "-n", ns, worker["metadata"]["name"])["spec"]
             .get("nodeName") == big, timeout=120)
