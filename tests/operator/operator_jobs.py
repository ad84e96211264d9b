"""FineTuneJob documents for the operator's tests."""

from __future__ import annotations

import copy
from typing import Any

from finetune_api.model import FineTuneJob

BASE: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "llama", "namespace": "team-a",
                 "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "generation": 1,
                 "labels": {"kueue.x-k8s.io/queue-name": "gpu-queue", "team": "nlp"}},
    "spec": {
        "model": {"uri": "s3://models/llama"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "training": {"maxSteps": 100},
        "resources": {"workers": 4, "gpusPerWorker": 8, "cpusPerWorker": 32,
                      "memoryPerWorker": "256Gi",
                      "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100"},
                      "tolerations": [{"key": "dedicated", "operator": "Equal",
                                       "value": "training", "effect": "NoSchedule"}],
                      "priorityClassName": "training-high"},
        "checkpoint": {"uri": "s3://ckpt/runs", "everySteps": 10},
        "s3": {"secretRef": "s3-credentials", "endpoint": "http://minio.storage:9000",
               "region": "eu-west-1"},
    },
}


def _apply(doc: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    node = doc
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


def document(**changes: Any) -> dict[str, Any]:
    """BASE with dotted-path changes (None deletes): document(**{"spec.s3": None})."""
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        _apply(doc, path, value)
    return doc


def job(**changes: Any) -> FineTuneJob:
    return FineTuneJob.from_document(document(**changes))
