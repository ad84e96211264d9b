"""The trainer's progress events, read from a Ray job's log, as FineTuneJob status.

Ray's logs endpoint returns the whole log every time; `LogCursor` remembers how far it has
parsed so each poll only parses what is new (a restarted operator parses once from the top).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from finetune_api.events import OUTPUT_KEYS, parse_event_line
from finetune_api.status import Reason

# status.logTail is for a glance in `kubectl describe`; the full log is stored elsewhere.
LOG_TAIL_MAX_CHARS = 4000


@dataclass
class LogCursor:
    """Parses only the complete lines appended since the previous call."""
    submission_id: str
    offset: int = 0
    events: int = 0
    last_failed: dict[str, Any] | None = None

    def feed(self, log: str) -> list[dict[str, Any]]:
        if len(log) < self.offset:
            # The log shrank: a different log (or rotated); start over.
            self.offset = 0
        end = log.rfind("\n", self.offset) + 1
        if end <= self.offset:
            return []
        chunk = log[self.offset:end]
        self.offset = end
        events = [e for e in (parse_event_line(line) for line in chunk.splitlines())
                  if e is not None]
        self.events += len(events)
        for e in events:
            if e["event"] == "failed":
                self.last_failed = e
        return events


@dataclass
class Tracked:
    """The status fields the events of one poll produce."""
    progress: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)
    best_eval: dict[str, Any] = field(default_factory=dict)
    failure: str = ""
    # Kubernetes Events the trainer's events call for: (type, reason, message).
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.progress:
            out["progress"] = self.progress
        if self.checkpoint:
            out["checkpoint"] = self.checkpoint
        if self.best_eval:
            out["bestEval"] = self.best_eval
        if self.output:
            out["output"] = self.output
        if self.tracking:
            out["tracking"] = self.tracking
        return out


def _time(event: dict[str, Any]) -> str:
    t = event.get("time")
    when = (datetime.fromtimestamp(float(t), timezone.utc) if isinstance(t, (int, float))
            else datetime.now(timezone.utc))
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _percent(step: int, total: int | None) -> int | None:
    if not total:
        return None
    return max(0, min(100, int(step * 100 // total)))


def _num(value: Any) -> float | None:
    """Numbers only: NaN/inf and junk are dropped, status must stay valid JSON."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def human_eta(seconds: int) -> str:
    """1h02m, 3m05s, 40s: status.progress.eta, the ETA column of `kubectl get ftj`."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# The `tracking` event's fields that status.tracking keeps.
TRACKING_FIELDS = ("tensorboardUri", "metricsUri", "mlflowRunId", "mlflowRunUrl")


def _tracking_event(e: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """status.tracking from a `tracking` event, and the Event's message naming the places."""
    where = {k: e[k] for k in TRACKING_FIELDS if isinstance(e.get(k), str) and e[k]}
    parts = [f"TensorBoard: {where['tensorboardUri']}"] if "tensorboardUri" in where else []
    if "mlflowRunId" in where:
        verb = "created" if e.get("mlflowRunCreated") else "continued"
        parts.append(f"MLflow run {where['mlflowRunId']} {verb}"
                     + (f": {where['mlflowRunUrl']}" if "mlflowRunUrl" in where else ""))
    return where, "; ".join(parts)


def apply_events(events: list[dict[str, Any]],
                 current: dict[str, Any] | None = None) -> Tracked:
    """Fold events into status.progress/checkpoint/output/bestEval, starting from the current
    status. bestEval is the lowest evalLoss and its step, with the checkpoint of that step
    (the checkpoint event comes before or after the eval event of its step)."""
    current = current or {}
    progress = dict(current.get("progress") or {})
    checkpoint = dict(current.get("checkpoint") or {})
    output = dict(current.get("output") or {})
    where = dict(current.get("tracking") or {})
    best = dict(current.get("bestEval") or {})
    failure = ""
    changed = {"progress": False, "checkpoint": False, "output": False, "tracking": False,
               "best": False}
    recorded: list[tuple[str, str, str]] = []
    for e in events:
        kind = e["event"]
        if kind == "started":
            total = e.get("totalSteps")
            if isinstance(total, int):
                progress["totalSteps"] = total
            resumed = e.get("resumedFromStep")
            if isinstance(resumed, int):
                progress["step"] = resumed
                pct = _percent(resumed, progress.get("totalSteps"))
                if pct is not None:
                    progress["percent"] = pct
            progress["updatedAt"] = _time(e)
            changed["progress"] = True
        elif kind == "progress":
            step = e.get("step")
            if not isinstance(step, int):
                continue
            progress["step"] = step
            if isinstance(e.get("totalSteps"), int):
                progress["totalSteps"] = e["totalSteps"]
            pct = _percent(step, progress.get("totalSteps"))
            if pct is not None:
                progress["percent"] = pct
            for key in ("loss", "learningRate", "tokensPerSecond"):
                value = _num(e.get(key))
                if value is not None:
                    progress[key] = value
            eta = _num(e.get("etaSeconds"))
            if eta is not None:
                progress["etaSeconds"] = int(round(eta))
                progress["eta"] = human_eta(progress["etaSeconds"])
            progress["updatedAt"] = _time(e)
            changed["progress"] = True
        elif kind == "eval":
            loss, step = _num(e.get("evalLoss")), e.get("step")
            if loss is None or not isinstance(step, int):
                continue
            progress["evalLoss"], progress["evalStep"] = loss, step
            progress["updatedAt"] = _time(e)
            changed["progress"] = True
            if "loss" not in best or loss < best["loss"]:
                best = {"loss": loss, "step": step}
                # The checkpoint of that step, when it was announced before its eval.
                if checkpoint.get("step") == step:
                    best["checkpointUri"] = checkpoint["uri"]
                changed["best"] = True
        elif kind == "checkpoint":
            if isinstance(e.get("uri"), str) and isinstance(e.get("step"), int):
                checkpoint = {"uri": e["uri"], "step": e["step"]}
                changed["checkpoint"] = True
                if best.get("step") == e["step"] and best.get("checkpointUri") != e["uri"]:
                    best["checkpointUri"] = e["uri"]
                    changed["best"] = True
        elif kind == "completed":
            step = e.get("step")
            if isinstance(step, int):
                progress["step"] = step
                progress.setdefault("totalSteps", step)
            progress["percent"] = 100
            progress["etaSeconds"] = 0
            progress["eta"] = human_eta(0)
            loss = _num(e.get("loss"))
            if loss is not None:
                progress["loss"] = loss
            eval_loss = _num(e.get("evalLoss"))
            if eval_loss is not None:
                progress["evalLoss"] = eval_loss
            progress["updatedAt"] = _time(e)
            changed["progress"] = True
            for key in OUTPUT_KEYS:
                if isinstance(e.get(key), str):
                    output[key] = e[key]
                    changed["output"] = True
        elif kind == "tracking":
            new, message = _tracking_event(e)
            # An Event only when the places change (a new MLflow run, a new job): an
            # operator that restarts reads the log again from the top.
            if new and new != where:
                where = new
                changed["tracking"] = True
                recorded.append(("Normal", Reason.METRICS_TRACKING, message))
        elif kind == "failed":
            failure = f"{e.get('reason', 'Failed')}: {e.get('message', '')}".strip()
    return Tracked(progress=progress if changed["progress"] else {},
                   checkpoint=checkpoint if changed["checkpoint"] else {},
                   output=output if changed["output"] else {},
                   tracking=where if changed["tracking"] else {},
                   best_eval=best if changed["best"] else {},
                   failure=failure, events=recorded)


def log_tail(log: str, lines: int = 30) -> str:
    """The last `lines` lines of a log, capped in size for status."""
    tail = "\n".join(log.rstrip("\n").splitlines()[-lines:])
    if len(tail) > LOG_TAIL_MAX_CHARS:
        tail = "…" + tail[-(LOG_TAIL_MAX_CHARS - 1):]
    return tail
