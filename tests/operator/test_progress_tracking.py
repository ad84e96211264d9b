"""The trainer's events, read from a Ray job log, as status.progress/checkpoint/output."""

from __future__ import annotations

from finetune_api.events import format_event

from finetune_operator.tracking import LogCursor, apply_events, log_tail

PREFIX = "(RayTrainWorker pid=4242) "


def log_of(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def test_progress_events_become_status_progress():
    log = log_of(
        "Starting Ray job...",
        PREFIX + format_event("started", totalSteps=40, resumedFromStep=0, workers=2,
                              strategy="deepspeed"),
        PREFIX + format_event("progress", step=10, totalSteps=40, epoch=0, loss=2.5,
                              learningRate=1e-4, tokensPerSecond=1234.5, etaSeconds=31.6),
    )
    cursor = LogCursor("job-a1")
    tracked = apply_events(cursor.feed(log))
    p = tracked.progress
    assert (p["step"], p["totalSteps"], p["percent"]) == (10, 40, 25)
    assert p["loss"] == 2.5 and p["learningRate"] == 1e-4 and p["tokensPerSecond"] == 1234.5
    assert p["etaSeconds"] == 32
    assert p["updatedAt"].endswith("Z")
    assert tracked.checkpoint == {} and tracked.output == {}


def test_checkpoint_and_completion():
    events = LogCursor("x").feed(log_of(
        format_event("checkpoint", step=20, uri="s3://ckpt/runs/llama/checkpoint_000020"),
        format_event("completed", step=40, loss=0.9, modelUri="s3://ckpt/runs/llama/final"),
    ))
    tracked = apply_events(events, {"progress": {"totalSteps": 40, "step": 39}})
    assert tracked.checkpoint == {"uri": "s3://ckpt/runs/llama/checkpoint_000020", "step": 20}
    assert tracked.output == {"modelUri": "s3://ckpt/runs/llama/final"}
    assert tracked.progress["percent"] == 100 and tracked.progress["step"] == 40


def test_completion_of_an_adapter_job_names_the_adapter_and_the_merged_model():
    events = LogCursor("x").feed(log_of(
        format_event("completed", step=40, loss=0.9, modelUri="s3://ckpt/runs/llama/final",
                     adapterUri="s3://ckpt/runs/llama/adapter"),
    ))
    assert apply_events(events).output == {"modelUri": "s3://ckpt/runs/llama/final",
                                           "adapterUri": "s3://ckpt/runs/llama/adapter"}


def test_cursor_parses_only_new_complete_lines():
    cursor = LogCursor("x")
    first = format_event("progress", step=1, totalSteps=4, loss=3.0)
    second = format_event("progress", step=2, totalSteps=4, loss=2.0)
    assert len(cursor.feed(log_of(first) + second[:10])) == 1   # half a line waits
    assert cursor.feed(log_of(first) + second[:10]) == []       # nothing new
    new = cursor.feed(log_of(first, second))
    assert [e["step"] for e in new] == [2]
    assert cursor.events == 2


def test_a_shorter_log_starts_over():
    cursor = LogCursor("x")
    cursor.feed(log_of("a" * 100, format_event("progress", step=1, totalSteps=4)))
    again = cursor.feed(log_of(format_event("progress", step=3, totalSteps=4)))
    assert [e["step"] for e in again] == [3]


def test_failed_event_is_remembered_and_bad_numbers_dropped():
    cursor = LogCursor("x")
    tracked = apply_events(cursor.feed(log_of(
        '{"event": "progress", "step": 3, "totalSteps": 10, "loss": NaN}',
        format_event("failed", reason="TrainingFailed", message="CUDA error"),
    )))
    assert "loss" not in tracked.progress and tracked.progress["step"] == 3
    assert tracked.failure == "TrainingFailed: CUDA error"
    assert cursor.last_failed["message"] == "CUDA error"


def test_status_unchanged_by_a_log_without_events():
    assert apply_events([], {"progress": {"step": 5}}).as_status() == {}


def test_log_tail_keeps_the_last_lines_and_is_bounded():
    log = log_of(*(f"line {i}" for i in range(100)))
    tail = log_tail(log, 30)
    assert tail.splitlines()[0] == "line 70" and tail.splitlines()[-1] == "line 99"
    assert len(log_tail("x" * 10000 + "\n", 30)) <= 4000


def test_eta_for_people_and_the_loss_curve_in_output():
    events = LogCursor("x").feed(log_of(
        format_event("progress", step=1, totalSteps=40, loss=3.0, etaSeconds=3725),
        format_event("progress", step=2, totalSteps=40, loss=2.9, etaSeconds=185.4),
    ))
    assert apply_events(events[:1]).progress["eta"] == "1h02m"
    assert apply_events(events).progress["eta"] == "3m05s"
    done = apply_events(LogCursor("x").feed(log_of(format_event(
        "completed", step=40, loss=0.9, modelUri="s3://b/r/j/final", lossCurveUri="s3://b/r/j/loss-curve.png"))))
    assert done.progress["eta"] == "0s" and done.progress["etaSeconds"] == 0
    assert done.output == {"modelUri": "s3://b/r/j/final", "lossCurveUri": "s3://b/r/j/loss-curve.png"}


def test_tracking_event_names_the_places_in_status_and_one_event():
    line = format_event("tracking", tensorboardUri="s3://b/r/j/tensorboard", metricsUri="s3://b/r/j/metrics",
                        mlflowRunId="abc123", mlflowExperimentId="7", mlflowRunCreated=True,
                        mlflowRunUrl="https://mlflow.example/#/experiments/7/runs/abc123")
    tracked = apply_events(LogCursor("x").feed(log_of(PREFIX + line)))
    assert tracked.as_status()["tracking"] == {
        "tensorboardUri": "s3://b/r/j/tensorboard", "metricsUri": "s3://b/r/j/metrics", "mlflowRunId": "abc123",
        "mlflowRunUrl": "https://mlflow.example/#/experiments/7/runs/abc123"}
    ((kind, reason, message),) = tracked.events
    assert (kind, reason) == ("Normal", "MetricsTracking")
    assert message == ("TensorBoard: s3://b/r/j/tensorboard; MLflow run abc123 created: "
                       "https://mlflow.example/#/experiments/7/runs/abc123")
    # The same places again (an operator restarted, reading the log from the top; a resumed
    # attempt of the same MLflow run): no new Event, no status change.
    again = apply_events(LogCursor("x").feed(log_of(line)), tracked.as_status())
    assert again.events == [] and "tracking" not in again.as_status()
def test_eval_events_become_eval_loss_and_the_best_eval_with_its_checkpoint():
    ckpt = "s3://ckpt/runs/chat/checkpoint_step00000010_a"
    events = LogCursor("x").feed(log_of(
        format_event("eval", step=5, evalLoss=2.0, evalTokens=900, seconds=0.5),
        # Step 10's checkpoint is announced before its eval (SYNC), step 15's has none, and
        # step 20's comes after its eval (an ASYNC upload registers later).
        PREFIX + format_event("checkpoint", step=10, uri=ckpt),
        format_event("eval", step=10, evalLoss=1.5, evalTokens=900, seconds=0.5),
        format_event("eval", step=15, evalLoss=1.7, evalTokens=900, seconds=0.5),
    ))
    tracked = apply_events(events)
    assert (tracked.progress["evalLoss"], tracked.progress["evalStep"]) == (1.7, 15)
    assert tracked.best_eval == {"loss": 1.5, "step": 10, "checkpointUri": ckpt}
    assert tracked.as_status()["bestEval"] == tracked.best_eval

    status = {"progress": tracked.progress, "checkpoint": tracked.checkpoint, "bestEval": tracked.best_eval}
    later = LogCursor("y").feed(log_of(
        format_event("eval", step=20, evalLoss=1.2, evalTokens=900, seconds=0.5),
        format_event("checkpoint", step=20, uri=ckpt.replace("10_a", "20_a")),
        format_event("completed", step=20, loss=1.1, modelUri="s3://ckpt/runs/chat/final", evalLoss=1.2),
    ))
    tracked = apply_events(later, status)
    assert tracked.best_eval == {"loss": 1.2, "step": 20, "checkpointUri": ckpt.replace("10_a", "20_a")}
    assert tracked.progress["evalLoss"] == 1.2
    # A worse eval later changes the latest evalLoss, not the best.
    worse = apply_events(LogCursor("z").feed(log_of(format_event("eval", step=25, evalLoss=9.0))),
                         {"bestEval": tracked.best_eval})
    assert worse.progress["evalLoss"] == 9.0 and worse.best_eval == {}  # unchanged: nothing to write
