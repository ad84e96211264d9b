"""The RayCluster builder: spec in, KubeRay manifest out, valid against KubeRay's CRD, and
the very object the operator creates (`finetune render` prints it byte for byte)."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest
import yaml

from finetune_api.model import FineTuneJob
from finetune_operator.raycluster import auth_secret_name, build_raycluster, cluster_name
from finetune_operator.render import render_job
from finetune_operator.settings import Settings
from finetune_testbed.paths import KUBERAY_CRD
from finetune_testbed.ray_head import VENV_BIN
from finetune_testbed.schema_validation import CrdSchemaValidator

from conftest import NAMESPACE, wait_until
from operator_jobs import document, job

SETTINGS = Settings(default_image="registry.example/trainer:1", ray_version="2.60.0")


def workers(cluster):
    (group,) = cluster["spec"]["workerGroupSpecs"]
    return group


def container(pod_spec):
    (c,) = pod_spec["containers"]
    return c


def test_worker_group_has_fixed_size_and_gpu_limits():
    cluster = build_raycluster(job(), SETTINGS)
    group = workers(cluster)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    c = container(group["template"]["spec"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["resources"]["requests"] == {"cpu": "32", "memory": "256Gi"}
    assert c["resources"]["limits"]["cpu"] == "32"
    assert c["image"] == "registry.example/trainer:1"
    assert cluster["spec"]["enableInTreeAutoscaling"] is False


def test_head_hosts_no_training_and_serves_the_dashboard_on_all_interfaces():
    cluster = build_raycluster(job(), SETTINGS)
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    c = container(head["template"]["spec"])
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert {"name": "dashboard", "containerPort": 8265} in c["ports"]


def test_node_pool_selection_and_tolerations():
    spec = workers(build_raycluster(job(), SETTINGS))["template"]["spec"]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100"}
    assert spec["priorityClassName"] == "training-high"
    assert {"key": "dedicated", "operator": "Equal", "value": "training",
            "effect": "NoSchedule"} in spec["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists",
            "effect": "NoSchedule"} in spec["tolerations"]


def test_cpu_job_asks_for_no_gpu_and_no_gpu_toleration():
    cluster = build_raycluster(job(**{"spec.resources.gpusPerWorker": 0,
                                      "spec.resources.tolerations": None}), SETTINGS)
    spec = workers(cluster)["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(spec)
    assert "tolerations" not in spec


def test_user_gpu_toleration_is_not_duplicated():
    tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec = workers(build_raycluster(job(**{"spec.resources.tolerations": tol}),
                                    SETTINGS))["template"]["spec"]
    assert spec["tolerations"] == tol


def test_operator_default_node_pool_applies_only_to_jobs_that_name_none():
    settings = Settings.from_args(
        ["--default-node-selector", '{"pool": "a100"}',
         "--default-tolerations", '[{"key": "dedicated", "operator": "Exists"}]'], environ={})
    bare = job(**{"spec.resources.nodeSelector": None, "spec.resources.tolerations": None})
    spec = workers(build_raycluster(bare, settings))["template"]["spec"]
    assert spec["nodeSelector"] == {"pool": "a100"}
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Exists"},
                                   {"key": "nvidia.com/gpu", "operator": "Exists",
                                    "effect": "NoSchedule"}]
    own = workers(build_raycluster(job(), settings))["template"]["spec"]
    assert own["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100"}
    assert {"key": "dedicated", "operator": "Exists"} not in own["tolerations"]


@pytest.mark.parametrize("flag,value,message", [
    ("--default-node-selector", "{pool: a100}", "not valid JSON"),
    ("--default-node-selector", '["a100"]', "wants a JSON object"),
    ("--default-node-selector", '{"pool": 1}', "JSON object of strings"),
    ("--default-tolerations", '{"key": "x"}', "wants a JSON list"),
])
def test_bad_default_node_pool_settings_stop_the_operator_with_a_reason(flag, value, message):
    with pytest.raises(SystemExit, match=message):
        Settings.from_args([flag, value], environ={})


def test_s3_credentials_are_secret_references_never_values():
    cluster = build_raycluster(job(), SETTINGS)
    for pod in (cluster["spec"]["headGroupSpec"]["template"],
                workers(cluster)["template"]):
        env = {e["name"]: e for e in container(pod["spec"])["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {
                "name": "s3-credentials", "key": key}}}
        assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
        assert env["AWS_REGION"]["value"] == "eu-west-1"
        assert all("value" not in e for e in env.values() if e["name"].startswith("AWS_")
                   and e["name"] not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                         "AWS_REGION", "AWS_DEFAULT_REGION"))


def test_no_secret_ref_means_no_credential_env():
    cluster = build_raycluster(job(**{"spec.s3.secretRef": None, "spec.s3.endpoint": None}),
                               SETTINGS)
    names = [e["name"] for e in container(workers(cluster)["template"]["spec"])["env"]]
    assert "AWS_ACCESS_KEY_ID" not in names and "AWS_ENDPOINT_URL" not in names


def test_dev_shm_is_memory_backed_on_every_pod():
    cluster = build_raycluster(job(), SETTINGS)
    for pod in (cluster["spec"]["headGroupSpec"]["template"], workers(cluster)["template"]):
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["spec"]["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container(pod["spec"])["volumeMounts"]


def test_labels_tie_the_cluster_to_the_job_and_pass_the_queue_through():
    cluster = build_raycluster(job(), SETTINGS)
    labels = cluster["metadata"]["labels"]
    assert labels["finetune.dev/job"] == "llama"
    assert labels["app.kubernetes.io/managed-by"] == "finetune-operator"
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert labels["team"] == "nlp"  # the cluster carries all the job's labels (as kopf.adopt)
    assert cluster["metadata"]["name"] == cluster_name(job()) == "llama"
    # The pods only ours and Kueue's: a job's labels are not the pods' to select on.
    for pod in (cluster["spec"]["headGroupSpec"]["template"], workers(cluster)["template"]):
        assert pod["metadata"]["labels"] == {"finetune.dev/job": "llama",
                                             "app.kubernetes.io/managed-by": "finetune-operator",
                                             "kueue.x-k8s.io/queue-name": "gpu-queue"}


def test_a_job_label_does_not_override_ours():
    doc = document()
    doc["metadata"]["labels"]["finetune.dev/job"] = "other"
    cluster = build_raycluster(FineTuneJob.from_document(doc), SETTINGS)
    assert cluster["metadata"]["labels"]["finetune.dev/job"] == "llama"


def test_token_auth_is_on_and_kuberay_makes_the_token():
    # No secretName: KubeRay generates the token into a Secret named after the cluster.
    cluster = build_raycluster(job(), SETTINGS)
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    assert auth_secret_name(job()) == cluster["metadata"]["name"]


def test_image_override_wins_over_the_default():
    cluster = build_raycluster(job(**{"spec.resources.image": "mine:2"}), SETTINGS)
    assert container(workers(cluster)["template"]["spec"])["image"] == "mine:2"
    assert container(cluster["spec"]["headGroupSpec"]["template"]["spec"])["image"] == "mine:2"


def test_render_returns_the_cluster_owned_by_the_job():
    objs = render_job(job(), SETTINGS)
    assert [o["kind"] for o in objs] == ["RayCluster"]
    assert objs[0]["metadata"]["namespace"] == "team-a"
    assert objs[0]["metadata"]["ownerReferences"] == [{
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "llama",
        "uid": job().uid, "controller": True, "blockOwnerDeletion": True}]


def test_a_job_not_yet_applied_renders_without_owner_or_namespace():
    cluster = build_raycluster(job(**{"metadata.uid": None, "metadata.namespace": None}), SETTINGS)
    assert set(cluster["metadata"]) == {"name", "labels"}


# What the API server fills in on create: not the operator's to send, nor render's to print.
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_render_prints_byte_for_byte_the_raycluster_the_operator_creates(kube, start_operator,
                                                                         tmp_path):
    """The operator (kopf, in-process) creates the RayCluster in the API emulator; `finetune
    render` of the job as the API server stores it prints that object: created in its place,
    it would be stored byte for byte the same."""
    if not KUBERAY_CRD.exists():
        pytest.skip(f"KubeRay's CRD (reference data) is not at {KUBERAY_CRD}")
    kube.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                 "metadata": {"name": "s3-credentials", "namespace": NAMESPACE},
                 "data": {k: base64.b64encode(b"x").decode()
                          for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}, "secrets")
    start_operator()
    doc = document(**{"metadata.namespace": NAMESPACE, "metadata.uid": None,
                      "metadata.generation": None})
    kube.create(doc, "finetunejobs")
    created = wait_until(lambda: kube.get_or_none("ray.io/v1", "rayclusters", "llama", NAMESPACE),
                         30, what="the RayCluster")
    for key in SERVER_FIELDS:
        created["metadata"].pop(key, None)
    created.pop("status", None)
    # The labels kopf.adopt would copy and the owner reference are there: render has them.
    assert created["metadata"]["labels"]["team"] == "nlp"
    stored_job = kube.get("finetune.dev/v1alpha1", "finetunejobs", "llama", NAMESPACE)
    assert created["metadata"]["ownerReferences"][0]["uid"] == stored_job["metadata"]["uid"]

    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({k: stored_job[k] for k in ("apiVersion", "kind", "metadata",
                                                                   "spec")}, sort_keys=False))
    rendered = subprocess.run([str(VENV_BIN / "finetune"), "render", str(job_file)],
                              capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    # The API server stores the request with the CRD's defaults filled in (ports' protocol:
    # TCP): render's output through the same admission is, byte for byte, what it stored.
    (printed,) = yaml.safe_load_all(rendered.stdout)
    admitted, _ = CrdSchemaValidator.from_file(KUBERAY_CRD, "v1").admit(printed)
    assert yaml.safe_dump(admitted, sort_keys=False) == yaml.safe_dump(created, sort_keys=False)


@pytest.fixture(scope="module")
def kuberay_schema():
    if not KUBERAY_CRD.exists():
        pytest.skip(f"KubeRay's CRD is not at {KUBERAY_CRD}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(KUBERAY_CRD.read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def _structural(schema):
    """OpenAPI v3 structural schema → JSON Schema: int-or-string, and no unknown fields."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _structural(v) if isinstance(v, dict) else
           [_structural(i) for i in v] if isinstance(v, list) and k in ("allOf", "anyOf", "oneOf")
           else v for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if "properties" in schema:
        out["properties"] = {k: _structural(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = _structural(schema["items"])
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@pytest.mark.parametrize("changes", [
    {},
    {"spec.resources.gpusPerWorker": 0, "spec.resources.tolerations": None},
    {"spec.s3": None, "spec.resources.nodeSelector": None,
     "spec.resources.priorityClassName": None},
], ids=["gpu", "cpu", "minimal"])
def test_cluster_validates_against_kuberay_crd(kuberay_schema, changes):
    import jsonschema

    cluster = build_raycluster(job(**changes), SETTINGS)
    cluster["metadata"]["namespace"] = "team-a"
    schema = _structural(kuberay_schema)
    schema["properties"]["metadata"] = {"type": "object"}
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cluster), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_structural_check_catches_unknown_fields(kuberay_schema):
    """The check above can fail: a field KubeRay does not know is refused."""
    import jsonschema

    cluster = build_raycluster(job(), SETTINGS)
    cluster["spec"]["headGroupSpec"]["bogus"] = 1
    schema = _structural(kuberay_schema)
    schema["properties"]["metadata"] = {"type": "object"}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(cluster))


def test_mlflow_credentials_are_optional_secret_references_on_every_pod():
    tracked = job(**{"spec.tracking": {"mlflow": {"uri": "https://mlflow.example", "experiment": "sft",
                                                  "secretRef": "mlflow-credentials"}}})
    cluster = build_raycluster(tracked, SETTINGS)
    for pod in (cluster["spec"]["headGroupSpec"]["template"], workers(cluster)["template"]):
        env = {e["name"]: e for e in container(pod["spec"])["env"]}
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {
                "name": "mlflow-credentials", "key": key, "optional": True}}}
    # The server's address travels in the job document, not as a credential.
    assert "mlflow.example" not in json.dumps(container(workers(cluster)["template"]["spec"])["env"])
    names = [e["name"] for e in container(workers(build_raycluster(job(), SETTINGS))["template"]["spec"])["env"]]
    assert not [n for n in names if n.startswith("MLFLOW_")]
