"""The operator end to end on the real stack: a FineTuneJob applied with kubectl runs on real
pods (a head and two workers, ZeRO-3 or FSDP across them) to Succeeded with a final model;
the FSDP one first waits for its S3 Secret.

The operator is the chart's (its ServiceAccount's token, the RBAC Helm renders, the
Deployment's environment) and runs in a network namespace of its own on the pod network,
reaching the API server at the `kubernetes` Service's ClusterIP and the Ray dashboard at the
head address KubeRay publishes, as it would in a pod. The real KubeRay makes the RayCluster's
pods; the process kubelet runs them (real `ray start`, the real trainer inside Ray on the
worker pod); the S3 credentials reach the pods only through the RayCluster's
`secretKeyRef` to the job's Secret; moto listens on the pod network's gateway.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from .on_pods import operator_on_pods, s3_secret
from .waiting import wait_for

pytestmark = [pytest.mark.realkube, pytest.mark.e2e, pytest.mark.timeout(1200)]


# Each pod's own checkpoint files: DeepSpeed's per-rank model states, DCP's per-rank shards.
SHARDS = {
    "deepspeed": ("_model_states.pt", ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                                       "zero_pp_rank_1_mp_rank_00_model_states.pt"]),
    "fsdp": (".distcp", ["__0_0.distcp", "__1_0.distcp"]),
}


@pytest.mark.parametrize("strategy", [{"type": "deepspeed", "deepspeed": {"stage": 3}},
                                      {"type": "fsdp", "fsdp": {"shardingStrategy": "FULL_SHARD"}}],
                         ids=["zero3", "fsdp"])
def test_apply_runs_to_success_on_real_pods(kubestack, kubelet, s3_server, tiny_assets, strategy):
    name = "pods"
    # The FSDP job is applied before its S3 Secret exists: it waits (SecretNotFound, no
    # cluster), and goes on by itself once the Secret is created.
    late_secret = strategy["type"] == "fsdp"
    with operator_on_pods(kubestack, kubelet, "e2e", with_secret=not late_secret) as env:
        # Two workers, so two worker pods: the strategy shards across the pod network, each
        # pod uploading its own shard with the keys it got through secretKeyRef.
        ns, doc = env.ns, env.job(name, s3_server, tiny_assets, {
            "resources": {"workers": 2}, "strategy": strategy,
            "runPolicy": {"ttlSecondsAfterFinished": 30}})

        def status() -> dict:
            return kubestack.get("finetunejob", "-n", ns, name).get("status") or {}
        applied = kubestack.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        assert f"finetunejob.finetune.dev/{name} created" in applied.stdout
        if late_secret:
            st = wait_for("the job to wait for its Secret", lambda: (lambda s: s if any(
                c.get("reason") == "SecretNotFound" for c in s.get("conditions") or [])
                else None)(status()), timeout=60, interval=1)
            assert st["phase"] == "Pending" and "spec.s3.secretRef" in st["message"] + str(st["conditions"])
            time.sleep(4)  # two reconcile intervals: nothing is created meanwhile
            assert not kubestack.get("rayclusters", "-n", ns)["items"]
            kubestack.apply(s3_secret(ns))
        st = wait_for("the job to finish on real pods",
                      lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed")
                               else None)(status()), timeout=900, interval=2)
        assert st["phase"] == "Succeeded", (st, env.operator.text()[-3000:])
        assert st["progress"]["step"] == 6 and st["progress"]["percent"] == 100
        ckpt_run = f"{doc['spec']['checkpoint']['uri']}/{name}"
        assert st["output"]["modelUri"] == f"{ckpt_run}/final"
        prefix = st["output"]["modelUri"][len(f"s3://{s3_server.bucket}/"):] + "/"
        assert any(k.endswith("model.safetensors") for k in s3_server.keys(prefix))
        ckpt = st["checkpoint"]["uri"][len(f"s3://{s3_server.bucket}/"):] + "/"
        suffix, expected = SHARDS[strategy["type"]]
        shards = [k for k in s3_server.keys(ckpt) if k.endswith(suffix)]
        assert sorted(k.rsplit("/", 1)[1] for k in shards) == expected, shards
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
        # ttlSecondsAfterFinished: the job itself goes, and nothing of it comes back (no
        # cluster recreated for a job being deleted, no pods); its checkpoints stay.
        wait_for("the job to be deleted after its TTL", lambda: kubestack.request(
            "GET", f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/{name}")[0] == 404,
            timeout=120, interval=1)
        time.sleep(6)  # three reconcile intervals
        assert kubestack.request("GET", f"/apis/ray.io/v1/namespaces/{ns}/rayclusters/{name}")[0] == 404
        assert not kubestack.get("pods", "-n", ns)["items"]
        assert s3_server.keys(ckpt), "checkpoints are kept"
        assert env.operator.proc.poll() is None, env.operator.text()[-3000:]
    # No 403 beyond the denials the chart documents for namespaced mode (as test_rbac).
    assert not env.forbidden(), env.forbidden()
