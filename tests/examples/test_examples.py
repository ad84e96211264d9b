"""The examples: valid for `finetune validate`, for the API server's admission of the CRD,
and saying what their names promise."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from finetune_api import KIND
from finetune_api.model import FineTuneJob
from finetune_operator.render import render_job
from finetune_operator.settings import QUEUE_LABEL, Settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CRD = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
SECRET_FILE = EXAMPLES / "s3-credentials-secret.yaml"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


JOB_FILES = sorted(p for p in EXAMPLES.glob("*.yaml")
                   if any(d.get("kind") == KIND for d in documents(p)))
MINE = ["llama2-7b-zero3.yaml", "fsdp-hybrid.yaml", "zero3-cpu-offload.yaml",
        "kueue-queued.yaml"]


def raw(name: str) -> dict:
    """The example as written (FineTuneJob.document carries the schema's defaults)."""
    (doc,) = [d for d in documents(EXAMPLES / name) if d["kind"] == KIND]
    return doc


def job(name: str) -> FineTuneJob:
    return FineTuneJob.from_document(raw(name))


def finetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune_cli", *args],
                          capture_output=True, text=True, cwd=REPO)


def test_the_examples_are_there():
    names = {p.name for p in JOB_FILES}
    assert set(MINE) <= names, set(MINE) - names


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_example_passes_finetune_validate(path):
    result = finetune("validate", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_all_examples_pass_validate_in_one_run_as_ci_would():
    # The GitOps pipeline step of docs/gitops.md: every file, Secrets skipped.
    result = finetune("validate", "--skip-other-kinds", *map(str, sorted(EXAMPLES.glob("*.yaml"))))
    assert result.returncode == 0, result.stdout + result.stderr


def test_validate_rejects_the_secret_without_skip_other_kinds():
    # So the flag above is doing something.
    assert finetune("validate", str(SECRET_FILE)).returncode != 0


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_example_is_admitted_by_the_crd(path):
    """The API server's view, through the e2e emulator's admission (other CEL engine)."""
    schema_validation = pytest.importorskip("kube.schema_validation")
    validator = schema_validation.CrdSchemaValidator.from_file(CRD)
    for doc in documents(path):
        if doc["kind"] == KIND:
            stored, warnings = validator.admit(doc)
            assert warnings == []
            assert stored["spec"]["model"] == doc["spec"]["model"]


def test_secret_example_is_a_valid_secret_with_obvious_placeholders():
    (secret,) = documents(SECRET_FILE)
    kubernetes_validate.validate(secret, "1.33.0", strict=True)
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    # stringData, so people write plain values and not base64.
    assert "data" not in secret
    values = secret["stringData"]
    assert set(values) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith("REPLACE_ME") for v in values.values())
    assert "REPLACE" in SECRET_FILE.read_text().split("apiVersion")[0]


def test_secret_refs_name_the_example_secret():
    (secret,) = documents(SECRET_FILE)
    for name in MINE:
        assert job(name).spec.s3.secret_ref == secret["metadata"]["name"], name


def test_llama2_7b_zero3():
    spec = raw("llama2-7b-zero3.yaml")["spec"]
    assert "Llama-2-7b" in spec["model"]["uri"]
    assert spec["strategy"] == {"type": "deepspeed", "deepspeed": {"stage": 3}}
    assert spec["resources"]["workers"] == 8 and spec["resources"]["gpusPerWorker"] == 1
    assert spec["training"]["precision"] == "bf16"
    assert spec["checkpoint"]["uri"].startswith("s3://")
    assert spec["resources"]["nodeSelector"]
    assert spec["resources"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_fsdp_hybrid():
    spec = raw("fsdp-hybrid.yaml")["spec"]
    assert spec["strategy"]["type"] == "fsdp"
    assert spec["strategy"]["fsdp"]["shardingStrategy"] == "HYBRID_SHARD"
    assert spec["resources"]["workers"] == 4 and spec["resources"]["gpusPerWorker"] == 8


def test_zero3_cpu_offload():
    ds = raw("zero3-cpu-offload.yaml")["spec"]["strategy"]["deepspeed"]
    assert ds == {"stage": 3, "offloadOptimizer": "cpu", "offloadParam": "cpu"}


def test_kueue_label_reaches_the_raycluster_and_its_pods():
    j = job("kueue-queued.yaml")
    queue = raw("kueue-queued.yaml")["metadata"]["labels"][QUEUE_LABEL]
    cluster = next(o for o in render_job(j, Settings()) if o["kind"] == "RayCluster")
    assert cluster["metadata"]["labels"][QUEUE_LABEL] == queue
    assert cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"][QUEUE_LABEL] == queue
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["template"]["metadata"]["labels"][QUEUE_LABEL] == queue


@pytest.mark.parametrize("name", ["llama2-7b-zero3.yaml", "fsdp-hybrid.yaml"])
def test_gpu_examples_land_on_their_node_pool(name):
    j = job(name)
    spec = raw(name)["spec"]["resources"]
    cluster = next(o for o in render_job(j, Settings()) if o["kind"] == "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert group["replicas"] == spec["workers"]
    assert pod["nodeSelector"] == spec["nodeSelector"]
    assert spec["tolerations"][0] in pod["tolerations"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == spec["gpusPerWorker"]
    # Credentials travel by reference, never by value.
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
