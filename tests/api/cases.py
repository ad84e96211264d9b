"""A table of FineTuneJob documents: good ones, and bad ones with the field each must name.

Shared by the offline validator's tests and by the agreement test against the Kubernetes
API emulator (which checks the same documents with an independent CEL implementation).
"""

from __future__ import annotations

import copy
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
}
