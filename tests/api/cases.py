"""A table of FineTuneJob documents: good ones, and bad ones with the field each must name.

Shared by the offline validator's tests and by the agreement test against the Kubernetes
API emulator (which checks the same documents with an independent CEL implementation).
"""

from __future__ import annotations

import copy
import json
from typing import Any

BASE: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "case"},
    "spec": {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"uri": "s3://data/train.jsonl", "maxSeqLength": 64},
        "strategy": {"type": "deepspeed", "deepspeed": {"stage": 3}},
        "training": {"maxSteps": 10, "microBatchSize": 2},
        "resources": {"workers": 2, "gpusPerWorker": 0, "cpusPerWorker": 1},
        "checkpoint": {"uri": "s3://ckpt/runs", "everySteps": 5},
        "s3": {"secretRef": "s3-credentials", "endpoint": "http://127.0.0.1:9000"},
    },
}

_DELETE = object()


def _apply(doc: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    node = doc
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


def make(**changes: Any) -> dict[str, Any]:
    """BASE with dotted-path changes: make(**{"spec.training.seed": 3})."""
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        _apply(doc, path, value)
    return doc


GOOD: dict[str, dict[str, Any]] = {
    "base": make(),
    "fsdp-full-shard": make(**{"spec.strategy": {"type": "fsdp",
                                                 "fsdp": {"shardingStrategy": "FULL_SHARD"}}}),
    "fsdp-hybrid-2-workers": make(**{"spec.strategy": {
        "type": "fsdp", "fsdp": {"shardingStrategy": "HYBRID_SHARD"}}}),
    "fsdp-without-block": make(**{"spec.strategy": {"type": "fsdp"}}),
    "zero3-offload": make(**{"spec.strategy.deepspeed": {
        "stage": 3, "offloadOptimizer": "cpu", "offloadParam": "cpu"}}),
    "zero2-offload-optimizer": make(**{"spec.strategy.deepspeed": {
        "stage": 2, "offloadOptimizer": "cpu"}}),
    "raw-deepspeed-config": make(**{"spec.strategy.deepspeed.config": {
        "zero_optimization": {"stage3_prefetch_bucket_size": 1000}}}),
    "nulls-are-pruned": make(**{"spec.training.maxSteps": None,
                                "spec.runPolicy": {"activeDeadlineSeconds": None}}),
    "fp16-on-gpus": make(**{"spec.training.precision": "fp16",
                            "spec.resources.gpusPerWorker": 1}),
    "hf-model-file-checkpoint": make(**{"spec.model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
                                        "spec.checkpoint.uri": "file:///mnt/ckpt"}),
    "node-pool": make(**{"spec.resources.nodeSelector": {"pool": "a100"},
                         "spec.resources.tolerations": [
                             {"key": "nvidia.com/gpu", "operator": "Exists",
                              "effect": "NoSchedule"}],
                         "spec.resources.memoryPerWorker": "64Gi"}),
    "mlflow-tracking": make(**{"spec.tracking.mlflow": {
        "uri": "https://mlflow.example.com/tracking", "experiment": "llama2-sft",
        "secretRef": "mlflow-credentials"}}),
    "lora-zero3": make(**{"spec.adapter": {"type": "lora"}}),
    "lora-fsdp-targets-merge": make(**{"spec.strategy": {"type": "fsdp"},
                                       "spec.adapter": {"type": "lora", "rank": 16, "alpha": 32,
                                                        "dropout": 0.05, "merge": True,
                                                        "targetModules": ["q_proj", "v_proj"]}}),
    "qlora-zero2-on-gpus": make(**{"spec.adapter": {"type": "qlora"},
                                   "spec.strategy.deepspeed": {"stage": 2},
                                   "spec.resources.gpusPerWorker": 1}),
    "minimal": {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": "minimal"},
                "spec": {"model": {"uri": "hf://gpt2"}, "dataset": {"uri": "s3://d/x.jsonl"},
                         "checkpoint": {"uri": "s3://c/p"}}},
}

# name -> (document, the field path the error must name)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "no-model": (make(**{"spec.model": _DELETE}), "spec.model"),
    "no-dataset-uri": (make(**{"spec.dataset.uri": _DELETE}), "spec.dataset.uri"),
    "no-checkpoint": (make(**{"spec.checkpoint": _DELETE}), "spec.checkpoint"),
    "model-uri-scheme": (make(**{"spec.model.uri": "gs://models/x"}), "spec.model.uri"),
    "dataset-uri-hf": (make(**{"spec.dataset.uri": "hf://datasets/x"}), "spec.dataset.uri"),
    "checkpoint-uri-http": (make(**{"spec.checkpoint.uri": "https://bucket/x"}),
                            "spec.checkpoint.uri"),
    "micro-batch-zero": (make(**{"spec.training.microBatchSize": 0}),
                         "spec.training.microBatchSize"),
    "grad-accum-negative": (make(**{"spec.training.gradientAccumulationSteps": -1}),
                            "spec.training.gradientAccumulationSteps"),
    "learning-rate-zero": (make(**{"spec.training.learningRate": 0}),
                           "spec.training.learningRate"),
    "epochs-string": (make(**{"spec.training.epochs": "three"}), "spec.training.epochs"),
    "precision-unknown": (make(**{"spec.training.precision": "fp8"}),
                          "spec.training.precision"),
    "scheduler-unknown": (make(**{"spec.training.lrScheduler": "step"}),
                          "spec.training.lrScheduler"),
    "stage-4": (make(**{"spec.strategy.deepspeed.stage": 4}), "spec.strategy.deepspeed.stage"),
    "offload-param-stage-2": (make(**{"spec.strategy.deepspeed": {
        "stage": 2, "offloadParam": "cpu"}}), "spec.strategy.deepspeed.offloadParam"),
    "offload-nvme": (make(**{"spec.strategy.deepspeed.offloadOptimizer": "nvme"}),
                     "spec.strategy.deepspeed.offloadOptimizer"),
    "fsdp-block-with-deepspeed": (make(**{"spec.strategy.fsdp": {
        "shardingStrategy": "FULL_SHARD"}}), "spec.strategy.fsdp"),
    "deepspeed-block-with-fsdp": (make(**{"spec.strategy.type": "fsdp"}),
                                  "spec.strategy.deepspeed"),
    "strategy-unknown": (make(**{"spec.strategy": {"type": "megatron"}}),
                         "spec.strategy.type"),
    "sharding-unknown": (make(**{"spec.strategy": {"type": "fsdp", "fsdp": {
        "shardingStrategy": "FULL"}}}), "spec.strategy.fsdp.shardingStrategy"),
    "hybrid-one-worker": (make(**{"spec.strategy": {"type": "fsdp", "fsdp": {
        "shardingStrategy": "HYBRID_SHARD"}}, "spec.resources.workers": 1}),
        "spec.strategy.fsdp.shardingStrategy"),
    "cpu-offload-no-shard": (make(**{"spec.strategy": {"type": "fsdp", "fsdp": {
        "shardingStrategy": "NO_SHARD", "cpuOffload": True}}}),
        "spec.strategy.fsdp.cpuOffload"),
    "qlora-on-cpu": (make(**{"spec.adapter": {"type": "qlora"},
                             "spec.strategy.deepspeed": {"stage": 2}}), "spec.adapter.type"),
    "qlora-zero3": (make(**{"spec.adapter": {"type": "qlora"},
                            "spec.resources.gpusPerWorker": 1}), "spec.adapter.type"),
    "qlora-fsdp": (make(**{"spec.adapter": {"type": "qlora"}, "spec.strategy": {"type": "fsdp"},
                           "spec.resources.gpusPerWorker": 1}), "spec.adapter.type"),
    "adapter-without-type": (make(**{"spec.adapter": {"rank": 8}}), "spec.adapter.type"),
    "adapter-type-unknown": (make(**{"spec.adapter": {"type": "ia3"}}), "spec.adapter.type"),
    "lora-rank-zero": (make(**{"spec.adapter": {"type": "lora", "rank": 0}}),
                       "spec.adapter.rank"),
    "lora-dropout-one": (make(**{"spec.adapter": {"type": "lora", "dropout": 1}}),
                         "spec.adapter.dropout"),
    "lora-target-empty-name": (make(**{"spec.adapter": {"type": "lora", "targetModules": [""]}}),
                               "spec.adapter.targetModules[0]"),
    "fp16-on-cpu": (make(**{"spec.training.precision": "fp16"}), "spec.training.precision"),
    "warmup-past-max-steps": (make(**{"spec.training.warmupSteps": 10}),
                              "spec.training.warmupSteps"),
    "workers-zero": (make(**{"spec.resources.workers": 0}), "spec.resources.workers"),
    "gpus-negative": (make(**{"spec.resources.gpusPerWorker": -1}),
                      "spec.resources.gpusPerWorker"),
    "memory-not-quantity": (make(**{"spec.resources.memoryPerWorker": "lots"}),
                            "spec.resources.memoryPerWorker"),
    "node-selector-number": (make(**{"spec.resources.nodeSelector": {"pool": 3}}),
                             "spec.resources.nodeSelector.pool"),
    "toleration-operator": (make(**{"spec.resources.tolerations": [
        {"key": "gpu", "operator": "Maybe"}]}), "spec.resources.tolerations[0].operator"),
    "toleration-exists-value": (make(**{"spec.resources.tolerations": [
        {"key": "gpu", "operator": "Exists", "value": "x"}]}),
        "spec.resources.tolerations[0].value"),
    "every-steps-zero": (make(**{"spec.checkpoint.everySteps": 0}),
                         "spec.checkpoint.everySteps"),
    "keep-zero": (make(**{"spec.checkpoint.keep": 0}), "spec.checkpoint.keep"),
    "endpoint-no-scheme": (make(**{"spec.s3.endpoint": "minio:9000"}), "spec.s3.endpoint"),
    "secret-ref-upper": (make(**{"spec.s3.secretRef": "My_Secret"}), "spec.s3.secretRef"),
    "backoff-negative": (make(**{"spec.runPolicy": {"backoffLimit": -1}}),
                         "spec.runPolicy.backoffLimit"),
    "cleanup-unknown": (make(**{"spec.runPolicy": {"cleanupPolicy": "Never"}}),
                        "spec.runPolicy.cleanupPolicy"),
    "deadline-zero": (make(**{"spec.runPolicy": {"activeDeadlineSeconds": 0}}),
                      "spec.runPolicy.activeDeadlineSeconds"),
    "typo-field": (make(**{"spec.training.learningrate": 0.1}), "spec.training.learningrate"),
    "max-seq-too-small": (make(**{"spec.dataset.maxSeqLength": 4}),
                          "spec.dataset.maxSeqLength"),
    "mlflow-uri-not-http": (make(**{"spec.tracking.mlflow": {"uri": "mlflow.example.com:5000",
                                                             "experiment": "sft"}}),
                            "spec.tracking.mlflow.uri"),
    "mlflow-credentials-in-uri": (make(**{"spec.tracking.mlflow": {
        "uri": "https://user:secret@mlflow.example.com", "experiment": "sft"}}),
        "spec.tracking.mlflow.uri"),
    "mlflow-no-experiment": (make(**{"spec.tracking.mlflow": {"uri": "http://mlflow:5000"}}),
                             "spec.tracking.mlflow.experiment"),
    "mlflow-empty-experiment": (make(**{"spec.tracking.mlflow": {"uri": "http://mlflow:5000",
                                                                 "experiment": ""}}),
                                "spec.tracking.mlflow.experiment"),
}
BAD.update({
    # Names the RayCluster could not carry: refused at admission by the CRD's root CEL rules.
    "name-with-dot": (make(metadata={"name": "team.job"}), "metadata.name"),
    "name-46-chars": (make(metadata={"name": "x" * 46}), "metadata.name"),
    # KubeRay refuses a RayCluster name that is not a DNS-1035 label (a digit first).
    "name-leading-digit": (make(metadata={"name": "1abc"}), "metadata.name"),
    "generate-name-leading-digit": (make(metadata={"generateName": "7job-"}),
                                    "metadata.generateName"),
    "generate-name-41-chars": (make(metadata={"generateName": "x" * 41}),
                               "metadata.generateName"),
    "generate-name-upper": (make(metadata={"generateName": "Job-"}), "metadata.generateName"),
    # Sizes, counts and steps that must be more than zero (or not negative).
    "memory-negative": (make(**{"spec.resources.memoryPerWorker": "-1Gi"}),
                        "spec.resources.memoryPerWorker"),
    "memory-zero": (make(**{"spec.resources.memoryPerWorker": "0"}),
                    "spec.resources.memoryPerWorker"),
    "memory-zero-gi": (make(**{"spec.resources.memoryPerWorker": "0.0Gi"}),
                       "spec.resources.memoryPerWorker"),
    "memory-zero-exponent": (make(**{"spec.resources.memoryPerWorker": "0e3"}),
                             "spec.resources.memoryPerWorker"),
    "cpus-zero": (make(**{"spec.resources.cpusPerWorker": 0}), "spec.resources.cpusPerWorker"),
    "epochs-zero": (make(**{"spec.training.epochs": 0}), "spec.training.epochs"),
    "max-steps-zero": (make(**{"spec.training.maxSteps": 0}), "spec.training.maxSteps"),
    "warmup-negative": (make(**{"spec.training.warmupSteps": -1}), "spec.training.warmupSteps"),
    "weight-decay-negative": (make(**{"spec.training.weightDecay": -0.1}),
                              "spec.training.weightDecay"),
    "max-grad-norm-negative": (make(**{"spec.training.maxGradNorm": -1}),
                               "spec.training.maxGradNorm"),
    "seed-negative": (make(**{"spec.training.seed": -1}), "spec.training.seed"),
    "learning-rate-above-one": (make(**{"spec.training.learningRate": 1.5}),
                                "spec.training.learningRate"),
    "max-seq-too-large": (make(**{"spec.dataset.maxSeqLength": 2 ** 21}),
                          "spec.dataset.maxSeqLength"),
    "ttl-negative": (make(**{"spec.runPolicy": {"ttlSecondsAfterFinished": -1}}),
                     "spec.runPolicy.ttlSecondsAfterFinished"),
    "max-steps-float": (make(**{"spec.training.maxSteps": 1.5}), "spec.training.maxSteps"),
})

BAD.update({
    # The evaluation set is files or a fraction of the training records, never both.
    "eval-uri-and-fraction": (make(**{"spec.dataset.evalUri": "s3://data/eval.jsonl",
                                      "spec.dataset.evalFraction": 0.1}),
                              "spec.dataset.evalFraction"),
    "eval-every-without-eval-set": (make(**{"spec.training.evalEverySteps": 5}),
                                    "spec.training.evalEverySteps"),
    "eval-fraction-zero": (make(**{"spec.dataset.evalFraction": 0}), "spec.dataset.evalFraction"),
    "eval-fraction-above-half": (make(**{"spec.dataset.evalFraction": 0.9}),
                                 "spec.dataset.evalFraction"),
    "format-unknown": (make(**{"spec.dataset.format": "sharegpt"}), "spec.dataset.format"),
    "long-records-unknown": (make(**{"spec.dataset.longRecords": "split"}),
                             "spec.dataset.longRecords"),
    "messages-field-empty": (make(**{"spec.dataset.messagesField": ""}),
                             "spec.dataset.messagesField"),
})

GOOD.update({
    "chat-eval-fraction": make(**{"spec.dataset": {
        "uri": "s3://data/chat.jsonl", "format": "chat", "maxSeqLength": 64,
        "evalFraction": 0.05, "evalSeed": 7, "longRecords": "drop"},
        "spec.training.evalEverySteps": 5}),
    "prompt-completion-eval-uri": make(**{"spec.dataset": {
        "uri": "s3://data/pc.parquet", "format": "prompt-completion", "promptField": "q",
        "completionField": "a", "evalUri": "s3://data/pc-eval.parquet"}}),
    "generate-name": make(metadata={"generateName": "sweep-"}),
    "name-45-chars": make(metadata={"name": "x" * 45}),
    "memory-fraction": make(**{"spec.resources.memoryPerWorker": "0.5Gi"}),
    "memory-exponent": make(**{"spec.resources.memoryPerWorker": "129e6"}),
})


# -- job files as text: what kubectl's YAML reading (sigs.k8s.io/yaml, go-yaml v2) makes of
# them. `finetune validate` must read them as kubectl does; the admission-agreement test sends
# what the reader made to the API server emulator.

JOB_YAML = """\
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: {name}
spec:
  model: {{uri: "s3://models/tiny"}}
  dataset: {{uri: "s3://data/train.jsonl", maxSeqLength: 64}}
  training:
    {training}
  resources: {{workers: 2, gpusPerWorker: 0, cpusPerWorker: 1}}
  checkpoint: {{uri: "s3://ckpt/runs", everySteps: 5}}
"""


def job_text(training: str = "maxSteps: 10", name: str = "case") -> str:
    """A job file with these lines (indented by the caller past the first) under training."""
    return JOB_YAML.format(training=training, name=name)


ABSENT = object()  # the field is not in the stored object (a null pruned, say)

# name -> (file text, {field path: the value the API server stores})
TEXT_GOOD: dict[str, tuple[str | bytes, dict[str, Any]]] = {
    "exponent-float": (job_text("learningRate: 3e-3"), {"spec.training.learningRate": 0.003}),
    "exponent-upper-signed": (job_text("learningRate: 2E-05"),
                              {"spec.training.learningRate": 2e-05}),
    "exponent-integer": (job_text("maxSteps: 1e3"), {"spec.training.maxSteps": 1000}),
    "leading-dot": (job_text("maxSteps: 10\n    weightDecay: .5"),
                    {"spec.training.weightDecay": 0.5}),
    "trailing-dot": (job_text("maxSteps: 10.\n    epochs: 2.0"),
                     {"spec.training.maxSteps": 10, "spec.training.epochs": 2}),
    "hex": (job_text("seed: 0x1F"), {"spec.training.seed": 31}),
    "octal-0o": (job_text("seed: 0o17"), {"spec.training.seed": 15}),
    "octal-leading-zero": (job_text("seed: 017"), {"spec.training.seed": 15}),
    "not-octal-is-float": (job_text("seed: 08"), {"spec.training.seed": 8}),
    "binary": (job_text("seed: 0b101"), {"spec.training.seed": 5}),
    "underscores": (job_text("maxSteps: 1_000"), {"spec.training.maxSteps": 1000}),
    "plus-sign": (job_text("microBatchSize: +2"), {"spec.training.microBatchSize": 2}),
    "yes-is-true": (job_text("activationCheckpointing: yes"),
                    {"spec.training.activationCheckpointing": True}),
    "on-is-true": (job_text("activationCheckpointing: On"),
                   {"spec.training.activationCheckpointing": True}),
    "y-is-true": (job_text("activationCheckpointing: y"),
                  {"spec.training.activationCheckpointing": True}),
    "off-is-false": (job_text("activationCheckpointing: OFF"),
                     {"spec.training.activationCheckpointing": False}),
    "tilde-is-null": (job_text("maxSteps: ~\n    seed: null"),
                      {"spec.training.maxSteps": ABSENT, "spec.training.seed": 42}),
    "timestamp-stays-text": (job_text("maxSteps: 10") +
                             "  runPolicy: {suspend: false}\n"
                             "  strategy: {type: deepspeed, deepspeed: {config: "
                             "{note: 2024-01-01}}}\n",
                             {"spec.strategy.deepspeed.config": {"note": "2024-01-01"}}),
    "sexagesimal-stays-text": (job_text().replace(
        "name: case", "name: case\n  labels:\n    window: 1:30"),
        {"metadata.labels.window": "1:30"}),
    "merge-key": (job_text("<<: {maxSteps: 20, seed: 7}\n    maxSteps: 30"),
                  {"spec.training.maxSteps": 30, "spec.training.seed": 7}),
    "json": (json.dumps(make(**{"spec.training.learningRate": 0.003})),
             {"spec.training.learningRate": 0.003}),
    "json-exponents": ('{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", '
                       '"metadata": {"name": "j"}, "spec": {"model": {"uri": "hf://gpt2"}, '
                       '"dataset": {"uri": "s3://d/x.jsonl"}, "checkpoint": {"uri": "s3://c/p"},'
                       ' "training": {"learningRate": 3e-3, "maxSteps": 1e3}}}',
                       {"spec.training.learningRate": 0.003, "spec.training.maxSteps": 1000}),
    "utf8-bom": ("\ufeff" + job_text(), {"spec.training.maxSteps": 10}),
    "utf16-with-bom": (job_text().encode("utf-16"), {"spec.training.maxSteps": 10}),
}

# name -> (file text or bytes, the field the error names (None: the file), words the message
# has, where it is refused: "kubectl" before anything is sent, "admission" at the API server)
TEXT_BAD: dict[str, tuple[str | bytes, str | None, str, str]] = {
    "nan": (job_text("learningRate: .nan"), "spec.training.learningRate", "NaN", "kubectl"),
    "infinity": (job_text("maxGradNorm: .inf"), "spec.training.maxGradNorm", "infinity",
                 "kubectl"),
    "negative-infinity": (job_text("weightDecay: -.Inf"), "spec.training.weightDecay",
                          "infinity", "kubectl"),
    "duplicate-key": (job_text("maxSteps: 10\n    seed: 1\n    maxSteps: 20"),
                      "spec.training.maxSteps", "duplicate key", "kubectl"),
    "duplicate-block": (job_text() + "  training: {maxSteps: 5}\n", "spec.training",
                        "duplicate key", "kubectl"),
    "json-duplicate-key": ('{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", '
                           '"metadata": {"name": "j", "name": "k"}, "spec": {}}',
                           "metadata.name", "duplicate key", "kubectl"),
    "json-nan": ('{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", '
                 '"spec": {"training": {"learningRate": NaN}}}', None, "NaN", "kubectl"),
    "not-utf8": (job_text().encode().replace(b"name: case", b"name: caf\xe9"),
                 "metadata.name", "not UTF-8: byte 0xe9", "kubectl"),
    "not-utf8-key": (job_text().encode().replace(b"maxSteps", b"max\xffSteps"),
                     "spec.training.max?Steps", "not UTF-8: byte 0xff", "kubectl"),
    "not-utf8-in-a-comment": (job_text().encode() + b"# caf\xe9\n", None, "not UTF-8",
                              "kubectl"),
    "utf16-without-bom": (job_text().encode("utf-16-le"), None, "character #x0000",
                          "kubectl"),
    "deep-nesting": (job_text() + "  strategy:\n    deepspeed:\n      config:\n" +
                     "".join("  " * (i + 4) + f"k{i}:\n" for i in range(150)) +
                     "  " * 154 + "leaf: 1\n", "spec.strategy.deepspeed.config",
                     "nested deeper than", "kubectl"),
    "deep-flow-nesting": ("[" * 5000 + "]" * 5000, None, "nest", "kubectl"),
    "excessive-aliasing": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdef", "bcdefg")), None, "aliasing", "kubectl"),
    "null-map-key": (job_text().replace("cpusPerWorker: 1}", "cpusPerWorker: 1, "
                                        "nodeSelector: {~: a100}}"),
                     "spec.resources.nodeSelector", "null map key", "kubectl"),
    "unknown-anchor": (job_text("maxSteps: *steps"), "spec.training.maxSteps",
                       "unknown anchor", "kubectl"),
    "not-yaml": ("spec: [unclosed\n", None, "not valid YAML", "kubectl"),
    "tab-indent": (job_text().replace("  training:\n    maxSteps", "  training:\n\tmaxSteps"),
                   None, "not valid YAML", "kubectl"),
    "control-character": (job_text().replace("name: case", "name: ca\x07se"), None,
                          "not valid YAML", "kubectl"),
    # Read as kubectl reads them, and refused by the API server's schema.
    "quoted-number": (job_text('learningRate: "3e-3"'), "spec.training.learningRate",
                      "must be of type number", "admission"),
    "float-for-integer": (job_text("maxSteps: 1.5"), "spec.training.maxSteps",
                          "must be of type integer", "admission"),
    "past-int64-for-integer": (job_text("maxSteps: 1e30"), "spec.training.maxSteps",
                               "must be of type integer", "admission"),
    "no-is-false": (job_text(name="no"), "metadata.name", "must be of type string",
                    "admission"),
    "name-with-dot": (job_text(name="team.job"), "metadata.name", "lower-case", "admission"),
    "memory-negative": (job_text().replace("cpusPerWorker: 1}", "cpusPerWorker: 1, "
                                           "memoryPerWorker: -1Gi}"),
                        "spec.resources.memoryPerWorker", "more than zero", "admission"),
    "memory-zero": (job_text().replace("cpusPerWorker: 1}", "cpusPerWorker: 1, "
                                       "memoryPerWorker: 0Gi}"),
                    "spec.resources.memoryPerWorker", "more than zero", "admission"),
    "y-as-key": (job_text("maxSteps: 10\n    y: 1"), "spec.training.true", "unknown field",
                 "admission"),
}
