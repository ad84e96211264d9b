"""The operator end to end on the real stack: a FineTuneJob applied with kubectl runs on real
pods to Succeeded with a final model.

The operator is the chart's (its ServiceAccount's token, the RBAC Helm renders, the
Deployment's environment) and runs in a network namespace of its own on the pod network,
reaching the API server at the `kubernetes` Service's ClusterIP and the Ray dashboard at the
head address KubeRay publishes, as it would in a pod. The real KubeRay makes the RayCluster's
pods; the process kubelet runs them (real `ray start`, the real trainer inside Ray on the
worker pod); the S3 credentials reach the pods only through the RayCluster's
`secretKeyRef` to the job's Secret; moto listens on the pod network's gateway.
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid

import pytest
import yaml

from finetune_testbed.chart_install import install_rbac, render_release, start_operator
from finetune_testbed.rbac import TOLERATED_DENIALS
from finetune_testbed.tiny_jobs import tiny_job
from .conftest import PROCESS_POOL
from .waiting import wait_for

pytestmark = [pytest.mark.realkube, pytest.mark.e2e, pytest.mark.timeout(1200)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR",
                                  os.path.join(REPO, ".cache", "torch_extensions"))


def _job(name: str, ns: str, s3_server, tiny_assets) -> dict:
    return tiny_job(name, model_uri=tiny_assets.model_uri, dataset_uri=tiny_assets.dataset_uri,
                    bucket=s3_server.bucket, endpoint=s3_server.endpoint, namespace=ns,
                    spec={"resources": {"nodeSelector": {"finetune.dev/pool": PROCESS_POOL}},
                          "s3": {"secretRef": "s3-credentials"}}, checkpoint_prefix="pods")


def test_apply_runs_to_success_on_real_pods(kubestack, kubelet, s3_server, tiny_assets):
    suffix = uuid.uuid4().hex[:5]
    ns, name = f"e2e-{suffix}", "pods"
    release = render_release({"rbac": {"mode": "namespaced"}, "watchNamespaces": [ns]},
                             name=f"ft{suffix}", namespace=f"ft-system-{suffix}")
    install_rbac(kubestack, release)
    kubestack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    kubestack.apply({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": "s3-credentials", "namespace": ns},
                     "data": {k: base64.b64encode(os.environ[k].encode()).decode()
                              for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    token = kubestack.service_account_token(release.namespace, release.service_account)
    sandbox = kubelet.network.create_sandbox(release.namespace, f"{release.name}-operator")
    operator = start_operator(kubestack, release, token, sandbox=sandbox, extra_env={
        "FINETUNE_OPERATOR_RECONCILE_INTERVAL": "2",
        "FINETUNE_OPERATOR_TRACKING_INTERVAL": "2",
        # DeepSpeed's CPU ops are compiled once per machine; the pods share the build.
        "FINETUNE_OPERATOR_TRAINER_ENV":
            f"TORCH_EXTENSIONS_DIR={TORCH_EXTENSIONS};RAY_DEDUP_LOGS=0"})
    doc = _job(name, ns, s3_server, tiny_assets)

    def status() -> dict:
        return kubestack.get("finetunejob", "-n", ns, name).get("status") or {}
    try:
        applied = kubestack.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        assert f"finetunejob.finetune.dev/{name} created" in applied.stdout
        st = wait_for("the job to finish on real pods",
                      lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed")
                               else None)(status()), timeout=900, interval=2)
        assert st["phase"] == "Succeeded", (st, operator.text()[-3000:])
        assert st["progress"]["step"] == 6 and st["progress"]["percent"] == 100
        ckpt_run = f"{doc['spec']['checkpoint']['uri']}/{name}"
        assert st["output"]["modelUri"] == f"{ckpt_run}/final"
        prefix = st["output"]["modelUri"][len(f"s3://{s3_server.bucket}/"):] + "/"
        assert any(k.endswith("model.safetensors") for k in s3_server.keys(prefix))
        assert st.get("retries", 0) == 0
        # The cluster is cleaned up (cleanupPolicy DeleteCluster) and its pods' processes
        # with it.
        wait_for("the RayCluster and its pods to be gone", lambda: not kubestack.get(
            "pods", "-n", ns)["items"] and kubestack.request(
            "GET", f"/apis/ray.io/v1/namespaces/{ns}/rayclusters/{name}")[0] == 404,
            timeout=180, interval=1)
        assert not [w for w in kubelet.workers.values()
                    if w.pod["metadata"]["namespace"] == ns]
        secret_value = os.environ["AWS_SECRET_ACCESS_KEY"]
        assert secret_value not in json.dumps(kubestack.get("finetunejob", "-n", ns, name))
        assert operator.proc.poll() is None, operator.text()[-3000:]
    finally:
        operator.stop()
        kubelet.network.delete_sandbox(sandbox.name)
    # No 403 beyond the denials the chart documents for namespaced mode (as test_rbac).
    tolerated = {resource for (_, _, resource) in TOLERATED_DENIALS}
    forbidden = [line for line in operator.text().splitlines()
                 if re.search(r"\b(403|Forbidden|forbidden)\b", line)
                 and not any(r in line for r in tolerated)]
    assert not forbidden, forbidden
