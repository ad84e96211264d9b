"""Jobs and their RayClusters on the real stack, as the operator would create them."""

from __future__ import annotations

from api.cases import make
from finetune_api.model import FineTuneJob
from finetune_operator import raycluster
from finetune_operator.settings import Settings

from finetune_testbed.nodes import GPU_POOL
from .waiting import wait_for


def create_job_cluster(stack, ns: str, name: str, edit=None, **changes) -> dict:
    """A FineTuneJob (cases.BASE on the GPU pool, with `changes`) and the RayCluster the
    operator would create for it (its builder, exactly as reconcile.create_cluster sends it);
    no operator runs. `edit(cluster)`, if given, changes the built RayCluster first."""
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    doc = make(**{"metadata": {"name": name, "namespace": ns},
                  "spec.resources.nodeSelector": {"finetune.dev/pool": GPU_POOL},
                  "spec.training.precision": "bf16", **changes})
    status, job_body = stack.request(
        "POST", f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs", doc)
    assert status == 201, job_body.get("message")
    job = FineTuneJob.from_document(job_body)
    cluster = raycluster.build_raycluster(job, Settings())
    if edit:
        edit(cluster)
    status, created = stack.request("POST", f"/apis/ray.io/v1/namespaces/{ns}/rayclusters",
                                    cluster)
    assert status == 201, created.get("message")
    return created


def pods_of(stack, ns: str, cluster: str) -> list[dict]:
    return stack.get("pods", "-n", ns, "-l", f"ray.io/cluster={cluster}")["items"]


def bound_pods(stack, ns: str, cluster: str, count: int, timeout: float = 90.0) -> list[dict]:
    """The cluster's `count` pods once the scheduler has bound every one of them to a node."""
    def probe() -> list[dict] | None:
        pods = pods_of(stack, ns, cluster)
        return pods if len(pods) == count and all(p["spec"].get("nodeName") for p in pods) else None
    return wait_for(f"{cluster}'s {count} pods to be bound", probe, timeout=timeout)


def scheduled_condition(pod: dict) -> dict:
    return next((c for c in pod.get("status", {}).get("conditions", [])
                 if c["type"] == "PodScheduled"), {})
