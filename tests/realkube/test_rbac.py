"""The chart's RBAC, enforced by the real API server.

For each `rbac.mode` the ServiceAccount, Roles and bindings are installed exactly as Helm
renders them, and the real operator runs with that ServiceAccount's token and the rendered
Deployment's environment. It must get a job to its RayCluster (every call it needs is
granted: no 403 in its log beyond the denials the chart documents as tolerated), and calls
the chart does not grant are refused with 403 by the API server itself.
"""

from __future__ import annotations

import re
import uuid

import pytest

from api.cases import BASE
from finetune_testbed.rbac import TOLERATED_DENIALS

from finetune_testbed.chart_install import install_rbac, render_release, start_operator
from .waiting import wait_for

pytestmark = pytest.mark.realkube

S3_SECRET = "s3-credentials"


def _modes(suffix: str) -> dict[str, tuple[dict, str, str]]:
    team, other = f"team-{suffix}", f"other-{suffix}"
    return {
        "cluster": ({"rbac": {"mode": "cluster"}}, team, other),
        "namespaced": ({"rbac": {"mode": "namespaced"}, "watchNamespaces": [team]}, team,
                       other),
    }


def _job(name: str, ns: str) -> dict:
    return {**BASE, "metadata": {"name": name, "namespace": ns}}


def _secret(ns: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": S3_SECRET, "namespace": ns},
            "stringData": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"}}


def _forbidden_lines(log: str, mode: str) -> list[str]:
    tolerated = {resource for (_, _, resource) in TOLERATED_DENIALS} if mode == "namespaced" \
        else set()
    return [line for line in log.splitlines()
            if re.search(r"\b(403|Forbidden|forbidden)\b", line)
            and not any(r in line for r in tolerated)]


@pytest.mark.parametrize("mode", ["cluster", "namespaced"])
def test_the_operator_works_with_exactly_the_charts_grants(kubestack, mode):
    suffix = uuid.uuid4().hex[:5]
    values, team, other = _modes(suffix)[mode]
    release = render_release(values, name=f"ft{suffix}", namespace=f"ft-system-{suffix}")
    install_rbac(kubestack, release)
    kubestack.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
                     for n in (team, other)])
    kubestack.apply([_secret(team), _secret(other)])
    token = kubestack.service_account_token(release.namespace, release.service_account)

    def call(method: str, path: str, body=None) -> int:
        return kubestack.request(method, path, body, token=token)[0]

    # Not granted in any mode: the API server says 403.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "x"}]}}
    assert call("POST", f"/api/v1/namespaces/{team}/pods?dryRun=All", pod) == 403
    assert call("GET", f"/api/v1/namespaces/{team}/secrets") == 403  # get yes, list no
    assert call("POST", f"/api/v1/namespaces/{team}/secrets?dryRun=All", _secret(team)) == 403
    assert call("DELETE", "/api/v1/nodes/some-node") == 403
    assert call("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles") == 403
    # Granted where the mode says so.
    other_secret = call("GET", f"/api/v1/namespaces/{other}/secrets/{S3_SECRET}")
    other_clusters = call("GET", f"/apis/ray.io/v1/namespaces/{other}/rayclusters")
    all_jobs = call("GET", "/apis/finetune.dev/v1alpha1/finetunejobs")
    if mode == "cluster":
        assert (other_secret, other_clusters, all_jobs) == (200, 200, 200)
    else:
        assert (other_secret, other_clusters, all_jobs) == (403, 403, 403)
        assert call("GET", f"/api/v1/namespaces/{team}/secrets/{S3_SECRET}") == 200

    operator = start_operator(kubestack, release, token)
    try:
        kubestack.apply([_job("rbac-job", team), _job("rbac-job", other)])
        wait_for("the operator to create the job's RayCluster",
                 lambda: kubestack.request(
                     "GET", f"/apis/ray.io/v1/namespaces/{team}/rayclusters/rbac-job")[0] == 200,
                 timeout=120)
        wait_for("the operator to write the job's status",
                 lambda: (kubestack.get("finetunejob", "-n", team, "rbac-job")
                          .get("status") or {}).get("phase"))
        if mode == "namespaced":
            # The job in a namespace the release does not watch is left alone.
            status, body = kubestack.request(
                "GET", f"/apis/finetune.dev/v1alpha1/namespaces/{other}/finetunejobs/rbac-job")
            assert status == 200 and not body.get("status"), body.get("status")
        # Deleting the job runs the operator's clean-up (delete the RayCluster, drop the
        # finalizer) under the same grants.
        kubestack.kubectl("delete", "finetunejob", "-n", team, "rbac-job", "--wait=true",
                          "--timeout=90s", timeout=120)
        status, _ = kubestack.request(
            "GET", f"/apis/ray.io/v1/namespaces/{team}/rayclusters/rbac-job")
        assert status == 404
        assert operator.proc.poll() is None, operator.text()[-3000:]
    finally:
        operator.stop()
    assert not _forbidden_lines(operator.text(), mode), operator.text()[-4000:]
    if mode == "cluster":
        kubestack.kubectl("delete", "finetunejob", "-n", other, "rbac-job", "--wait=false")
