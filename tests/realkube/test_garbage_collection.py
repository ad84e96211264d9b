"""Owner references as the operator writes them, enforced by the real garbage collector.

The RayCluster is what the operator creates for a job (`build_raycluster` + `kopf.adopt`, as
in reconcile.create_cluster), so the real KubeRay CRD's schema admits it; KubeRay then
creates the cluster's own children (its token Secret, the head Service). Deleting the
FineTuneJob, with no operator running to clean up, leaves the work to
kube-controller-manager's garbage collector: the RayCluster, and with it everything KubeRay
made for it, must go.
"""

from __future__ import annotations

import base64
import uuid

import kopf
import pytest

from api.cases import BASE
from finetune_api.model import FineTuneJob
from finetune_operator import raycluster
from finetune_operator.settings import Settings

from .waiting import wait_for

pytestmark = pytest.mark.realkube


def _exists(stack, path: str) -> bool:
    status, _ = stack.request("GET", path)
    assert status in (200, 404), status
    return status == 200


def test_deleting_a_job_removes_the_raycluster_it_owns_and_kuberays_children(kubestack):
    ns = f"gc-{uuid.uuid4().hex[:6]}"
    kubestack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    doc = {**BASE, "metadata": {"name": "gc-job", "namespace": ns}}
    status, job_body = kubestack.request(
        "POST", f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs", doc)
    assert status == 201, job_body

    job = FineTuneJob.from_document(job_body)
    cluster = raycluster.build_raycluster(job, Settings())
    kopf.adopt(cluster, owner=job_body)
    status, created = kubestack.request(
        "POST", f"/apis/ray.io/v1/namespaces/{ns}/rayclusters", cluster)
    assert status == 201, created.get("message")
    name = created["metadata"]["name"]

    # KubeRay's answer to `authOptions: {mode: token}`: a Secret named after the cluster,
    # owned by it, holding the token under `auth_token`.
    secret_path = f"/api/v1/namespaces/{ns}/secrets/{raycluster.auth_secret_name(job)}"
    wait_for("KubeRay's token Secret", lambda: _exists(kubestack, secret_path))
    _, secret = kubestack.request("GET", secret_path)
    token = base64.b64decode(secret["data"][raycluster.AUTH_TOKEN_KEY])
    assert len(token) >= 32
    assert secret["metadata"]["labels"]["ray.io/cluster"] == name
    owner = secret["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("RayCluster", created["metadata"]["uid"])
    service_path = f"/api/v1/namespaces/{ns}/services/{name}-head-svc"
    wait_for("the head Service", lambda: _exists(kubestack, service_path))

    status, _ = kubestack.request(
        "DELETE", f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/gc-job")
    assert status == 200
    cluster_path = f"/apis/ray.io/v1/namespaces/{ns}/rayclusters/{name}"
    wait_for("the garbage collector to delete the RayCluster",
             lambda: not _exists(kubestack, cluster_path))
    wait_for("the garbage collector to delete KubeRay's Secret and Service",
             lambda: not _exists(kubestack, secret_path)
             and not _exists(kubestack, service_path))
