"""Rank 0's metrics sinks without Ray: two attempts of one run (the second resumed from the
first's checkpoint) into file:// TensorBoard files, the JSONL log and a real MLflow server,
read back with TensorBoard's event reader and MLflow's client."""

from __future__ import annotations

import pytest

from finetune_api.model import FineTuneJob
from finetune_trainer.loss_curve import read_curve
from finetune_trainer.metrics import Metrics
from finetune_trainer.storage import resolve


def attempt_values(step: int, attempt: int) -> dict:
    # The crashed attempt's steps past its checkpoint differ from the resumed one's.
    return {"loss": 3.0 - 0.2 * step + 0.05 * attempt, "learning_rate": 1e-3 * step, "grad_norm": 1.0 + step,
            "tokens_per_second": 100.0 * step, "eval_loss": 3.1 - 0.2 * step if step % 2 == 0 else None}


def test_two_attempts_make_one_curve_in_tensorboard_mlflow_and_the_log(tmp_path, mlflow_server):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "metrics-job"},
           "spec": {"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d"},
                    "training": {"learningRate": 0.001, "maxSteps": 6},
                    "checkpoint": {"uri": f"file://{tmp_path}/ckpt"},
                    "tracking": {"mlflow": {"uri": mlflow_server.uri, "experiment": "unit-metrics"}}}}
    job = FineTuneJob.from_document(doc)
    run = resolve(job.checkpoint_run_uri)

    first = Metrics(job, run, "attempt-a", 0, 6)
    where = first.describe()
    assert where["tensorboardUri"] == f"{job.checkpoint_run_uri}/tensorboard" and where["mlflowRunCreated"]
    for step in range(1, 5):  # checkpoint at 3, killed after 4
        first.log(step, attempt_values(step, 1))
        if step == 3:
            saved = first.state()
            first.checkpoint(step)
    first.close(None)

    second = Metrics(job, run, "attempt-b", 3, 6, tracking=saved)
    assert second.describe()["mlflowRunId"] == where["mlflowRunId"] and not second.describe()["mlflowRunCreated"]
    for step in range(4, 7):
        second.log(step, attempt_values(step, 2))
    second.checkpoint(6)
    second.close(f"{job.checkpoint_run_uri}/final")

    acc = EventAccumulator(f"{tmp_path}/ckpt/metrics-job/tensorboard")
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]  # step 4 once: the resume's
    expected = {s: attempt_values(s, 1 if s <= 3 else 2) for s in range(1, 7)}
    assert [e.value for e in loss] == pytest.approx([expected[s]["loss"] for s in range(1, 7)])
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4, 6]
    assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= set(acc.Tags()["scalars"])

    client = mlflow_server.client()
    (found,) = client.search_runs([client.get_experiment_by_name("unit-metrics").experiment_id])
    assert found.info.run_id == where["mlflowRunId"] and found.info.status == "FINISHED"
    assert found.data.tags["finetune.modelUri"] == f"{job.checkpoint_run_uri}/final"
    assert found.data.params["training.maxSteps"] == "6" and found.data.params["checkpoint.everySteps"] == "500"
    history = sorted(client.get_metric_history(found.info.run_id, "train/loss"), key=lambda m: (m.timestamp, m.step))
    latest = {}
    for m in history:
        latest[m.step] = m.value
    assert latest == pytest.approx({s: expected[s]["loss"] for s in range(1, 7)})
    # MLflow cannot forget: the crashed attempt's step 4 stays beside the resume's.
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "eval/loss")) == [2, 4, 4, 6]

    curve = read_curve(run)
    assert [a.name for a in curve.attempts] == ["attempt-a", "attempt-b"]
    assert curve.series("loss")[1] == pytest.approx([expected[s]["loss"] for s in range(1, 7)])
    assert curve.checkpoints == [3, 6]
