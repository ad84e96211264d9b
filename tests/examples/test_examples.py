"""The examples: valid for `finetune validate` and for the API server's admission of the CRD,
and doing what their names promise where it happens: in the RayCluster the operator creates
and in the configuration the trainer hands DeepSpeed or FSDP."""
from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from finetune_api import KIND
from finetune_api.model import FineTuneJob
from finetune_operator.render import render_job
from finetune_operator.settings import QUEUE_LABEL, Settings
from finetune_testbed.ray_head import VENV_BIN
from finetune_testbed.schema_validation import CrdSchemaValidator
from finetune_trainer.launcher import with_absolute_file_uris
from finetune_trainer.strategy_deepspeed import build_ds_config
from finetune_trainer.strategy_fsdp import hybrid_mesh_shape

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CRD = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
SECRET_FILE = EXAMPLES / "s3-credentials-secret.yaml"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


JOB_FILES = sorted(p for p in EXAMPLES.glob("*.yaml")
                   if any(d.get("kind") == KIND for d in documents(p)))
MINE = ["llama2-7b-zero3.yaml", "fsdp-hybrid.yaml", "zero3-cpu-offload.yaml",
        "kueue-queued.yaml", "llama3-8b-chat.yaml", "llama2-7b-lora.yaml"]


def raw(name: str) -> dict:
    """The example as written (FineTuneJob.document carries the schema's defaults)."""
    (doc,) = [d for d in documents(EXAMPLES / name) if d["kind"] == KIND]
    return doc


def job(name: str) -> FineTuneJob:
    return FineTuneJob.from_document(raw(name))


def finetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "finetune"), *args], capture_output=True, text=True,
                          cwd=REPO)


def raycluster(name: str) -> dict:
    (cluster,) = render_job(job(name), Settings())
    return cluster


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
    validator = CrdSchemaValidator.from_file(CRD)
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


# What each DeepSpeed example's name promises, in the config the trainer hands DeepSpeed.
DEEPSPEED_PROMISES = {
    "llama2-7b-zero3.yaml": {"stage": 3, "offload": set(), "bf16": True},
    "zero3-cpu-offload.yaml": {"stage": 3, "offload": {"offload_optimizer", "offload_param"},
                               "bf16": True},
    "kueue-queued.yaml": {"stage": 2, "offload": set(), "bf16": True},
    "tiny-cpu.yaml": {"stage": 3, "offload": set(), "bf16": False},  # CPU: fp32
    "tiny-chat-cpu.yaml": {"stage": 3, "offload": set(), "bf16": False},
    "llama3-8b-chat.yaml": {"stage": 3, "offload": set(), "bf16": True},
    "lora-tiny-cpu.yaml": {"stage": 3, "offload": set(), "bf16": False},
    "llama2-7b-lora.yaml": {"stage": 3, "offload": set(), "bf16": True},
}


@pytest.mark.parametrize("name", sorted(DEEPSPEED_PROMISES))
def test_deepspeed_examples_configure_deepspeed_as_named(name):
    spec = job(name).spec
    config = build_ds_config(spec.training, spec.strategy.deepspeed)
    promise = DEEPSPEED_PROMISES[name]
    zero = config["zero_optimization"]
    assert zero["stage"] == promise["stage"]
    assert {k for k in ("offload_optimizer", "offload_param") if k in zero} == promise["offload"]
    assert all(zero[k]["device"] == "cpu" for k in promise["offload"])
    assert config["bf16"]["enabled"] is promise["bf16"] and config["fp16"]["enabled"] is False
    # The batch the file asks for is the batch DeepSpeed runs.
    training = raw(name)["spec"]["training"]
    assert config["train_micro_batch_size_per_gpu"] == training.get("microBatchSize", 1)
    assert config["gradient_accumulation_steps"] == training.get("gradientAccumulationSteps", 1)


def test_every_deepspeed_example_is_covered():
    deepspeed = {p.name for p in JOB_FILES if job(p.name).spec.strategy.type == "deepspeed"}
    assert deepspeed == set(DEEPSPEED_PROMISES)


def test_fsdp_hybrid_shards_inside_a_pod_and_replicates_across_pods():
    cluster = raycluster("fsdp-hybrid.yaml")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    pods = group["replicas"]
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert (pods, gpus) == (4, 8)
    # HYBRID_SHARD: the trainer's device mesh shards over each pod's 8 GPUs, replicates x4.
    assert job("fsdp-hybrid.yaml").spec.strategy.fsdp.sharding_strategy == "HYBRID_SHARD"
    assert hybrid_mesh_shape(pods * gpus, gpus) == (4, 8)


def test_tiny_example_runs_on_cpus_from_where_it_is_started(tmp_path, monkeypatch):
    (group,) = raycluster("tiny-cpu.yaml")["spec"]["workerGroupSpecs"]
    assert "nvidia.com/gpu" not in str(group["template"]["spec"])
    # Its file:// paths have no leading slash: the trainer reads them from the directory
    # `finetune run` was started in, as `make demo` (finetune make-tiny .demo) expects.
    monkeypatch.chdir(tmp_path)
    spec = with_absolute_file_uris(job("tiny-cpu.yaml")).spec
    assert spec.model.uri == f"file://{tmp_path}/.demo/model"
    assert spec.dataset.uri == f"file://{tmp_path}/.demo/data/train.jsonl"
    assert spec.checkpoint.uri == f"file://{tmp_path}/.demo/checkpoints"


def test_kueue_label_reaches_the_raycluster_and_its_pods():
    queue = raw("kueue-queued.yaml")["metadata"]["labels"][QUEUE_LABEL]
    cluster = raycluster("kueue-queued.yaml")
    assert cluster["metadata"]["labels"][QUEUE_LABEL] == queue
    assert cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"][QUEUE_LABEL] == queue
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["template"]["metadata"]["labels"][QUEUE_LABEL] == queue


def test_chat_examples_train_on_chat_records_and_evaluate(tmp_path, monkeypatch):
    from finetune_trainer.data import Records

    for name in ("tiny-chat-cpu.yaml", "llama3-8b-chat.yaml"):
        spec = job(name).spec
        assert Records.of(spec.dataset).kind == "chat"
        assert (spec.dataset.eval_uri or spec.dataset.eval_fraction) and spec.training.eval_every_steps
    # The tiny one reads the chat records `finetune make-tiny .demo` writes (tiny.py).
    monkeypatch.chdir(tmp_path)
    spec = with_absolute_file_uris(job("tiny-chat-cpu.yaml")).spec
    assert spec.dataset.uri == f"file://{tmp_path}/.demo/data/chat.jsonl"
    assert spec.model.uri == f"file://{tmp_path}/.demo/model"


def test_lora_examples_train_an_adapter_and_name_what_they_write(tmp_path, monkeypatch):
    from finetune_trainer.adapters import lora_config

    tiny = job("lora-tiny-cpu.yaml")
    # The tiny one: the default targets (every linear layer but the head), adapter and merged
    # model out, on CPU, next to the plain tiny example's files.
    assert lora_config(tiny.spec.adapter).target_modules == "all-linear"
    assert set(tiny.outputs) == {"adapterUri", "modelUri"}
    assert tiny.spec.resources.gpus_per_worker == 0
    assert (raw("lora-tiny-cpu.yaml")["spec"]["model"], raw("lora-tiny-cpu.yaml")["spec"]["dataset"]) == \
        (raw("tiny-cpu.yaml")["spec"]["model"], raw("tiny-cpu.yaml")["spec"]["dataset"])
    llama = job("llama2-7b-lora.yaml")
    config = lora_config(llama.spec.adapter)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"}
    assert (config.r, config.lora_alpha) == (16, 32) and llama.spec.resources.gpus_per_worker == 1
    assert set(llama.outputs) == {"adapterUri", "modelUri"}


@pytest.mark.parametrize("name", ["llama2-7b-zero3.yaml", "fsdp-hybrid.yaml", "llama3-8b-chat.yaml",
                                  "llama2-7b-lora.yaml"])
def test_gpu_examples_land_on_their_node_pool(name):
    spec = raw(name)["spec"]["resources"]
    cluster = raycluster(name)
    (group,) = cluster["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert group["replicas"] == spec["workers"]
    assert pod["nodeSelector"] == spec["nodeSelector"]
    assert spec["tolerations"][0] in pod["tolerations"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == spec["gpusPerWorker"]
    # Credentials travel by reference, never by value.
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
