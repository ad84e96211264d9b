"""The trainer's events: one JSON object per line in its log.

The trainer writes them (`format_event`); `finetune run` and the operator read them back
from a log in which Ray may have put a prefix such as `(RayTrainWorker pid=12) ` before each
line (`parse_event_line`). Without a terminal, `finetune run`'s stdout is these events alone,
one per line, without prefixes. Every event carries `"event"` (its kind) and `"time"` (Unix
seconds); the fields of each kind are `EVENTS`' (the spec reference's table is made from it).
New fields may be added to a kind; none is renamed or removed.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from .schema import STATUS

EVENTS: dict[str, dict[str, str]] = {
    "started": {
        "totalSteps": "optimizer steps of the whole run",
        "resumedFromStep": "the checkpoint's step it resumed from; 0 from the base model",
        "workers": "training processes",
        "strategy": "`deepspeed` or `fsdp`",
    },
    "progress": {
        "step": "optimizer steps done",
        "totalSteps": "optimizer steps of the whole run",
        "epoch": "the epoch of that step (from 0)",
        "loss": "training loss of that step, averaged over the workers; null if not finite",
        "learningRate": "learning rate of that step",
        "tokensPerSecond": "tokens trained per second since the last progress event",
        "etaSeconds": "estimated seconds to the last step",
    },
    "data": {
        "format": "spec.dataset.format",
        "records": "the training records, over every worker's share",
        "truncated": "records longer than maxSeqLength, truncated (longRecords: truncate)",
        "droppedTooLong": "records longer than maxSeqLength, dropped (longRecords: drop)",
        "droppedNothingToLearn": "records left with no token in the loss (e.g. an answer cut off)",
        "evalRecords": "the evaluation set's records (counted once)",
        "evalRows": "the evaluation set's packed rows",
        "longRecords": "spec.dataset.longRecords",
    },
    "eval": {
        "step": "the step after which the evaluation ran",
        "evalLoss": "the evaluation loss: token losses summed over every worker, over their tokens",
        "evalTokens": "the tokens in the loss",
        "seconds": "how long the evaluation took",
    },
    "tracking": {
        "tensorboardUri": "the run's TensorBoard event files",
        "metricsUri": "the run's metrics log (JSONL, one file per attempt; `finetune plot` reads it)",
        "mlflowRunId": "with spec.tracking.mlflow: the MLflow run",
        "mlflowExperimentId": "with spec.tracking.mlflow: its experiment",
        "mlflowRunUrl": "with spec.tracking.mlflow: the run's page on the tracking server",
        "mlflowRunCreated": "false: a resumed attempt logs to the run of the attempts before it",
    },
    "checkpoint": {
        "step": "the step it holds",
        "uri": "where it is; printed once every worker's part is uploaded and Ray Train "
               "registered it (the one a rerun resumes from)",
    },
    "completed": {
        "step": "the last step",
        "loss": "its loss",
        "modelUri": "the final model (Hugging Face format; with an adapter: the merged model, "
                    "when spec.adapter.merge)",
        "adapterUri": "the trained adapter in PEFT's layout (with spec.adapter)",
        "evalLoss": "the last evaluation loss (with an evaluation set)",
        "lossCurveUri": "the loss-curve PNG, when it could be drawn",
    },
    "failed": {
        "reason": "a reason of the status vocabulary (`TrainingFailed`, `InvalidJob`, "
                  "`BadInput`, `Stopped`); the exit code tells whether a retry can help",
        "message": "one line for people",
        "rank": "the worker that failed, when one did (a dead worker's rank, not a symptom's)",
        "pid": "its process id (`finetune run` shows its last lines)",
        "signal": "`Stopped`: `SIGINT` or `SIGTERM`",
        "step": "`Stopped`: the last step reported before the stop",
        "resumeFromStep": "`Stopped`: the step a rerun resumes from (latest complete checkpoint)",
    },
}
EVENT_KINDS = tuple(EVENTS)
# The `completed` event's fields that name what the run wrote: status.output's.
OUTPUT_KEYS = tuple(STATUS["properties"]["output"]["properties"])
_MARKER = '{"event": '


def format_event(kind: str, **fields: Any) -> str:
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event {kind!r}")
    payload = {"event": kind, **fields, "time": round(time.time(), 3)}
    return json.dumps(payload, separators=(", ", ": "), allow_nan=False, default=str)


def parse_event_line(line: str) -> dict[str, Any] | None:
    """The event in a log line, or None for any other line."""
    start = line.find(_MARKER)
    if start < 0:
        return None
    try:
        payload = json.loads(line[start:].strip())
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("event") not in EVENT_KINDS:
        return None
    return payload


def parse_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    return [e for e in (parse_event_line(line) for line in lines) if e is not None]
