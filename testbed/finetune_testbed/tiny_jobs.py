"""The FineTuneJob the tests run for real: the tiny model and data in (moto) S3, a few CPU
steps, checkpoints in S3. One document for the trainer's, the operator's and the real pods'
tests, so a spec change is made once; each caller deep-merges what it needs on top."""

from __future__ import annotations

import copy
import uuid
from typing import Any


def deep_update(base: dict, override: dict) -> dict:
    """`base` with `override` merged in, dict by dict (a copy; neither is changed)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_job(name: str, *, model_uri: str, dataset_uri: str, bucket: str, endpoint: str,
             namespace: str | None = None, spec: dict[str, Any] | None = None,
             checkpoint_prefix: str = "runs") -> dict[str, Any]:
    """A job of one DeepSpeed worker on 1 CPU; each run checkpoints under a fresh prefix, so
    reruns in a session never resume each other's checkpoints."""
    base = {
        "model": {"uri": model_uri},
        "dataset": {"uri": dataset_uri, "maxSeqLength": 32},
        "strategy": {"type": "deepspeed"},
        "training": {"maxSteps": 6, "microBatchSize": 4, "learningRate": 0.01,
                     "warmupSteps": 1, "lrScheduler": "constant", "precision": "fp32"},
        "resources": {"workers": 1, "gpusPerWorker": 0, "cpusPerWorker": 1, "memoryPerWorker": "2Gi"},
        "checkpoint": {"uri": f"s3://{bucket}/{checkpoint_prefix}-{uuid.uuid4().hex[:8]}",
                       "everySteps": 2, "keep": 2},
        "s3": {"endpoint": endpoint, "region": "us-east-1"},
    }
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": metadata,
            "spec": deep_update(base, spec or {})}
