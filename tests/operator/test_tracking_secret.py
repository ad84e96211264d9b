"""The MLflow Secret (spec.tracking.mlflow.secretRef) is an input like the S3 one: the pods
read its keys as optional, so a missing or empty one would start a run that fails at the
tracking server. The operator waits for it, says so, and creates the RayCluster once it is
usable. Against the API emulator, without Ray."""

from __future__ import annotations

import base64

import pytest

from conftest import NAMESPACE, wait_until
from operator_jobs import document

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FTJ = ("finetune.dev/v1alpha1", "finetunejobs")
RC = ("ray.io/v1", "rayclusters")


def _ready(kube, name) -> dict:
    st = (kube.get_or_none(*FTJ, name, NAMESPACE) or {}).get("status") or {}
    return next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})


def _secret(**data: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "mlflow-auth", "namespace": NAMESPACE},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def test_a_missing_or_empty_mlflow_secret_holds_the_cluster_back_until_it_is_usable(kube, start_operator):
    name = "tracked"
    kube.create(document(**{"metadata.name": name, "metadata.namespace": NAMESPACE,
                            "metadata.uid": None, "metadata.generation": None,
                            "spec.s3.secretRef": None,
                            "spec.tracking.mlflow": {"uri": "http://mlflow.example:5000",
                                                     "experiment": "e", "secretRef": "mlflow-auth"}}),
                "finetunejobs")
    start_operator()
    cond = wait_until(lambda: (lambda c: c if c.get("reason") == "SecretNotFound" else None)(
        _ready(kube, name)), 30, what=lambda: f"SecretNotFound; Ready is {_ready(kube, name)}")
    assert "'mlflow-auth' (spec.tracking.mlflow.secretRef) not found" in cond["message"], cond
    assert kube.get_or_none(*RC, name, NAMESPACE) is None

    # A user name without its password authenticates nobody.
    kube.create(_secret(MLFLOW_TRACKING_USERNAME="ml"), "secrets")
    cond = wait_until(lambda: (lambda c: c if c.get("reason") == "SecretKeyMissing" else None)(
        _ready(kube, name)), 30, what=lambda: f"SecretKeyMissing; Ready is {_ready(kube, name)}")
    assert "MLFLOW_TRACKING_PASSWORD" in cond["message"] and "MLFLOW_TRACKING_TOKEN" in cond["message"]
    assert kube.get_or_none(*RC, name, NAMESPACE) is None

    kube.patch("v1", "secrets", "mlflow-auth",
               {"data": {"MLFLOW_TRACKING_PASSWORD": base64.b64encode(b"pw-7f3a9c").decode()}}, NAMESPACE)
    cluster = wait_until(lambda: kube.get_or_none(*RC, name, NAMESPACE), 30, what="the RayCluster")
    head_env = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in head_env
            if e["name"].startswith("MLFLOW_TRACKING_") and "valueFrom" in e}
    assert refs == {k: "mlflow-auth" for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                               "MLFLOW_TRACKING_TOKEN")}
    assert "pw-7f3a9c" not in str(cluster)  # by reference, never the value
    kube.delete(*FTJ, name, NAMESPACE)
    wait_until(lambda: kube.get_or_none(*FTJ, name, NAMESPACE) is None, 60, what="the job to go")
