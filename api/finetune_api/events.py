"""The trainer's progress events: one JSON object per line in its log.

The trainer writes them (`format_event`); `finetune run` and the operator read them back
from a log in which Ray may have put a prefix such as `(RayTrainWorker pid=12) ` before each
line (`parse_event_line`). Every event carries `"event"`:

- `started`:    {totalSteps, resumedFromStep, workers, strategy}
- `progress`:   {step, totalSteps, epoch, loss, learningRate, tokensPerSecond, etaSeconds}
- `checkpoint`: {step, uri}
- `completed`:  {step, loss, modelUri, adapterUri} (those of FineTuneJob.outputs the job wrote)
- `failed`:     {reason, message}
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from .schema import STATUS

EVENT_KINDS = ("started", "progress", "checkpoint", "completed", "failed")
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
