"""Automatic resume: a run killed after its first checkpoint continues from that step and
reaches the same losses as an uninterrupted run. The same runs check the metrics: the
TensorBoard files and the MLflow run (a real server) continue across the resume, read back
with TensorBoard's event reader and MLflow's client, and the loss curve is drawn."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.training

SPEC = {
    # ZeRO-2, fp32, gradient accumulation 2: the resumed run must restore optimizer, LR
    # schedule and data position exactly for the losses to match.
    "strategy": {"deepspeed": {"stage": 2}},
    # 7 optimizer steps per epoch on the tiny data: the resumed run restores a position in
    # the middle of epoch 0 and then crosses into epoch 1 (reshuffled with seed + 1).
    "training": {"maxSteps": 8, "gradientAccumulationSteps": 2, "microBatchSize": 4, "precision": "fp32",
                 "lrScheduler": "cosine", "warmupSteps": 2, "weightDecay": 0.01, "epochs": 3},
    "checkpoint": {"everySteps": 3, "keep": 2},
}


def test_resume_matches_uninterrupted_run(make_job, run_trainer, mlflow_server, s3_server, tmp_path):
    experiment = f"resume-{uuid.uuid4().hex[:6]}"
    job = make_job("resume-me", {**SPEC, "tracking": {"mlflow": {"uri": mlflow_server.uri, "experiment": experiment}}})
    # Killed after step 4: what it logged past its checkpoint (step 3) is superseded by the resume.
    hook = {"FINETUNE_FAULT_AFTER_STEP": "4"}
    crashed = run_trainer(job, env=hook)
    assert crashed.rc == 1, crashed.explain()
    (failed,) = crashed.of("failed")
    assert failed["reason"] == "TrainingFailed" and "injected failure after step 4" in failed["message"]
    assert [e["step"] for e in crashed.of("checkpoint")] == [3]
    assert not crashed.of("completed")

    resumed = run_trainer(job, env=hook)  # same job, same hook: a resumed attempt ignores it
    assert resumed.rc == 0, resumed.explain()
    (started,) = resumed.of("started")
    assert started["resumedFromStep"] == 3 and started["totalSteps"] == 8
    losses = resumed.losses()
    assert min(losses) == 4, losses  # continues after the checkpoint, not from 0
    assert [e["step"] for e in resumed.of("checkpoint")] == [6, 8]
    (completed,) = resumed.of("completed")
    assert completed["step"] == 8

    check_tensorboard(job, crashed, resumed, s3_server, tmp_path)

    # The uninterrupted reference: the same job with --fresh, which deliberately ignores the
    # checkpoints and starts from the base model at step 0.
    reference = run_trainer(job, fresh=True)
    assert reference.rc == 0, reference.explain()
    assert reference.of("started")[0]["resumedFromStep"] == 0
    ref_losses = reference.losses()
    assert {3, 6, 8} <= set(ref_losses), ref_losses
    assert crashed.losses()[3] == pytest.approx(ref_losses[3], rel=1e-6)
    for step in (6, 8):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), (step, losses, ref_losses)
    assert losses[8] < ref_losses[1]  # and it did learn
    epochs = {e["step"]: e["epoch"] for e in resumed.of("progress")}
    assert epochs[4] == 0 and epochs[8] == 1, epochs
    check_mlflow_and_curve(job, crashed, resumed, reference, mlflow_server, s3_server)


def run_prefix(job, s3_server) -> str:
    uri = f"{job['spec']['checkpoint']['uri']}/{job['metadata']['name']}"
    return uri[len(f"s3://{s3_server.bucket}/"):]


def check_tensorboard(job, crashed, resumed, s3_server, where):
    """The event files of both attempts, read back with TensorBoard's own reader: one curve,
    each step once, the crashed attempt's step past its checkpoint purged by the resume, and
    the values those of the trainer's own progress events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prefix = run_prefix(job, s3_server)
    keys = s3_server.keys(f"{prefix}/tensorboard/")
    assert len(keys) == 2, keys  # one file per attempt
    for key in keys:
        s3_server.client.download_file(s3_server.bucket, key, str(where / key.rsplit("/", 1)[-1]))
    acc = EventAccumulator(str(where))
    acc.Reload()
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "train/grad_norm"} <= \
        set(acc.Tags()["scalars"]), acc.Tags()

    def scalars(tag):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(1, 9)), (tag, [e.step for e in events])
        return {e.step: e.value for e in events}

    progress = {e["step"]: e for run in (crashed, resumed) for e in run.of("progress")
                if run is resumed or e["step"] <= 3}
    loss, lr = scalars("train/loss"), scalars("train/learning_rate")
    assert set(progress) >= {1, 3, 4, 6, 8}, sorted(progress)
    for step, e in progress.items():
        assert loss[step] == pytest.approx(e["loss"], rel=1e-5), (step, loss, e)
        assert lr[step] == pytest.approx(e["learningRate"], rel=1e-5), (step, lr, e)
    assert all(v > 0 for v in scalars("train/grad_norm").values())
    assert all(v > 0 for v in scalars("train/tokens_per_second").values())
    # The metrics log the loss curve is drawn from: one file per attempt.
    logs = s3_server.keys(f"{prefix}/metrics/")
    assert len(logs) == 2 and all(k.endswith(".jsonl") for k in logs), logs


def check_mlflow_and_curve(job, crashed, resumed, reference, mlflow_server, s3_server):
    (first,), (second,), (third,) = crashed.of("tracking"), resumed.of("tracking"), reference.of("tracking")
    run_uri = f"{job['spec']['checkpoint']['uri']}/{job['metadata']['name']}"
    assert first["tensorboardUri"] == f"{run_uri}/tensorboard" and first["metricsUri"] == f"{run_uri}/metrics"
    # One MLflow run for the crashed attempt and its resume; --fresh starts another.
    assert first["mlflowRunCreated"] is True and second["mlflowRunCreated"] is False
    assert second["mlflowRunId"] == first["mlflowRunId"] != third["mlflowRunId"] and third["mlflowRunCreated"]
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(job["spec"]["tracking"]["mlflow"]["experiment"])
    assert {r.info.run_id for r in client.search_runs([experiment.experiment_id])} == \
        {first["mlflowRunId"], third["mlflowRunId"]}
    run = client.get_run(first["mlflowRunId"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["finetune.modelUri"] == f"{run_uri}/final"
    assert run.data.params["training.maxSteps"] == "8" and run.data.params["strategy.deepspeed.stage"] == "2"
    assert run.data.params["model.uri"] == job["spec"]["model"]["uri"]
    assert not [k for k in run.data.params if k.startswith("tracking.")]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    latest = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        latest[m.step] = m.value  # MLflow keeps the crashed attempt's step 4 too; the resume's is last
    assert sorted(latest) == list(range(1, 9))
    for e in resumed.of("progress"):
        assert latest[e["step"]] == pytest.approx(e["loss"], rel=1e-5)
    assert set(client.get_run(third["mlflowRunId"]).data.metrics) >= {
        "train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"}

    # The loss curve, drawn by the driver at the end, next to the checkpoints.
    (completed,) = reference.of("completed")
    assert completed["lossCurveUri"] == f"{run_uri}/loss-curve.png"
    png = s3_server.client.get_object(Bucket=s3_server.bucket, Key=f"{run_prefix(job, s3_server)}/loss-curve.png")
    assert png["Body"].read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fsdp_resume_matches_uninterrupted_run(make_job, run_trainer):
    """FSDP2 FULL_SHARD, bf16 compute, gradient accumulation: the DCP checkpoint (sharded weights,
    AdamW's sharded state), the schedule and the data position restore exactly."""
    spec = {**SPEC, "strategy": {"type": "fsdp", "fsdp": {"shardingStrategy": "FULL_SHARD"}},
            "training": {**SPEC["training"], "maxSteps": 5, "precision": "bf16"}}
    job = make_job("resume-fsdp", spec)
    hook = {"FINETUNE_FAULT_AFTER_STEP": "4"}
    crashed = run_trainer(job, env=hook)
    assert crashed.rc == 1 and [e["step"] for e in crashed.of("checkpoint")] == [3], crashed.explain()
    resumed = run_trainer(job, env=hook)
    assert resumed.rc == 0, resumed.explain()
    assert resumed.of("started")[0]["resumedFromStep"] == 3 and min(resumed.losses()) == 4
    reference = run_trainer(job, fresh=True)
    assert reference.rc == 0, reference.explain()
    ref = reference.losses()
    for step in (4, 5):
        if step in ref:  # step 4 only when the reference's progress rate limit printed it
            assert resumed.losses()[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, resumed.losses(), ref)
    assert 5 in ref and resumed.losses()[5] < ref[1]
