"""Short runs (3 steps, 2 CPU workers) of every other strategy, offload and precision.

Combined to keep the suite fast: each run covers a strategy plus a precision and one more
feature (file:// URIs + parquet, activation checkpointing, gradient accumulation, CPU offload).
"""

from __future__ import annotations

import math
import os

import pytest

pytestmark = pytest.mark.training

VARIANTS = {
    # ZeRO-1, fp32, everything on file:// (model, parquet dataset, checkpoints).
    "zero1-fp32-file": {"strategy": {"deepspeed": {"stage": 1}}, "training": {"precision": "fp32"}},
    # ZeRO-3 with optimizer and parameter offload to CPU, bf16, activation checkpointing.
    "zero3-offload-bf16": {
        "strategy": {"deepspeed": {"stage": 3, "offloadOptimizer": "cpu", "offloadParam": "cpu"}},
        "training": {"precision": "bf16", "activationCheckpointing": True},
    },
    "fsdp-shard-grad-op-fp32": {
        "strategy": {"type": "fsdp", "fsdp": {"shardingStrategy": "SHARD_GRAD_OP"}},
        "training": {"precision": "fp32", "gradientAccumulationSteps": 2, "activationCheckpointing": True},
    },
    # ...and with the SYNC checkpoint upload (ASYNC is the default; see launcher.UPLOAD_MODE_ENV).
    "fsdp-no-shard-bf16-sync": {
        "strategy": {"type": "fsdp", "fsdp": {"shardingStrategy": "NO_SHARD"}},
        "training": {"precision": "bf16"},
    },
    "fsdp-hybrid-shard-fp32": {
        "strategy": {"type": "fsdp", "fsdp": {"shardingStrategy": "HYBRID_SHARD"}},
        "training": {"precision": "fp32"},
    },
}


def _write_parquet(dataset_path: str, out_dir) -> str:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(dataset_path) as f:
        texts = [json.loads(line)["text"] for line in f]
    path = os.path.join(out_dir, "train.parquet")
    pq.write_table(pa.table({"content": texts}), path)
    return path


@pytest.mark.parametrize("name", list(VARIANTS))
def test_strategy_variant(name, make_job, run_trainer, tiny_assets, s3_server, tmp_path):
    spec = {"training": {"maxSteps": 3}, "checkpoint": {"everySteps": 2}, **VARIANTS[name]}
    spec["training"] = {"maxSteps": 3, **VARIANTS[name].get("training", {})}
    if name.endswith("-file"):
        parquet = _write_parquet(tiny_assets.dataset_path, tmp_path)
        spec.update(model={"uri": f"file://{tiny_assets.model_dir}"},
                    dataset={"uri": f"file://{parquet}", "textField": "content", "maxSeqLength": 32},
                    checkpoint={"uri": f"file://{tmp_path}/ckpt", "everySteps": 2})
    env = {"FINETUNE_CHECKPOINT_UPLOAD_MODE": "SYNC"} if name.endswith("-sync") else None
    run = run_trainer(make_job(name, spec), env=env)
    assert run.rc == 0, run.explain()
    losses = run.losses()
    assert max(losses) == 3 and all(math.isfinite(v) for v in losses.values()), losses
    assert [e["step"] for e in run.of("checkpoint")] == [2, 3]
    if env:
        assert "(SYNC upload)" in run.stdout
    (completed,) = run.of("completed")
    final = completed["modelUri"]
    ckpt_root = completed["modelUri"].rsplit("/final", 1)[0]
    for event in run.of("checkpoint"):
        assert event["uri"].startswith(ckpt_root + "/checkpoint_step")
    if final.startswith("file://"):
        assert os.path.exists(os.path.join(final[len("file://"):], "model.safetensors"))
    else:
        prefix = final[len(f"s3://{s3_server.bucket}/"):]
        assert f"{prefix}/model.safetensors" in s3_server.keys(prefix)
