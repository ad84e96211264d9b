"""The trainer's event lines, read back through Ray's log prefixes, and what `finetune run`
shows of them: the bar in a terminal, the event stream otherwise."""

from __future__ import annotations

import io
import json

import pytest

from finetune_api.events import format_event, parse_event_line, parse_events
from finetune_cli.console import Console
from finetune_cli.progress_bar import render_bar


def test_events_survive_ray_log_prefixes():
    line = format_event("progress", step=3, totalSteps=10, loss=2.5)
    for prefix in ("", "(RayTrainWorker pid=4242) ", "(RayTrainWorker pid=1, ip=10.0.0.1) "):
        event = parse_event_line(prefix + line + "\n")
        assert event["event"] == "progress" and event["step"] == 3 and event["loss"] == 2.5


def test_other_lines_are_not_events():
    assert parse_events(["hello", '{"event": "nope"}', '{"event": "progress"',
                         "loss=3", '{"step": 1}']) == []


def test_unknown_event_kinds_cannot_be_written():
    with pytest.raises(ValueError):
        format_event("progres", step=1)


def test_nan_loss_is_refused_rather_than_written_as_invalid_json():
    with pytest.raises(ValueError):
        format_event("progress", step=1, loss=float("nan"))


def _console(terminal: bool, verbose: bool = False):
    out, err = io.StringIO(), io.StringIO()
    return Console(out, err, terminal=terminal, verbose=verbose, log_path="/logs/run.log"), out, err


FEED = [
    format_event("started", totalSteps=4, resumedFromStep=2, workers=2, strategy="deepspeed"),
    "(RayTrainWorker pid=11) \x1b[36mTrainingReport(checkpoint=...)\x1b[0m",
    "(TrainController pid=9) PlacementGroupCleaner: Failed to query Ray Train Controller actor state",
    "finetune-train: took over the stale lease on file:///c/job from host h, pid 1",
    "finetune-train: took over the stale lease on file:///c/job from host h, pid 1",
    "(RayTrainWorker pid=11) " + format_event("progress", step=3, totalSteps=4, loss=1.25,
                                              tokensPerSecond=1000.0, etaSeconds=65),
    "(RayTrainWorker pid=11) finetune-train: checkpoint at step 3 stalled training for 0.20s",
    "(RayTrainWorker pid=11) " + format_event("checkpoint", step=3, uri="file:///c/job/ckpt3"),
    "(RayTrainWorker pid=11) " + format_event("progress", step=4, totalSteps=4, loss=1.0, evalLoss=1.5,
                                              etaSeconds=0),
    "(RayTrainWorker pid=12) Traceback (most recent call last):",
    "(RayTrainWorker pid=12) RuntimeError: boom on rank 1",
    "finetune-train: error: training failed: RuntimeError: boom on rank 1",
    format_event("failed", reason="TrainingFailed", message="training failed: RuntimeError: boom on rank 1",
                 rank=1, pid=12),
]


def test_terminal_shows_the_bar_and_our_lines_but_none_of_rays():
    console, out, err = _console(terminal=True)
    console.start()
    for line in FEED:
        console.feed(line + "\n")
    console.finish(1)
    text = out.getvalue()
    assert not err.getvalue()
    assert text.startswith("log: /logs/run.log (--verbose shows it here)\n")
    assert "training 4 steps on 2 worker(s), deepspeed, resumed from step 2\n" in text
    assert text.count("took over the stale lease") == 1  # warnings once, in words
    for ray_internal in ("TrainingReport", "PlacementGroupCleaner", "pid=", "stalled training", '{"event"'):
        assert ray_internal not in text, ray_internal
    assert "step 3/4  75%" in text and "loss 1.2500" in text and "1,000 tok/s" in text and "ETA 01:05" in text
    assert "\r\033[K[" in text  # redrawn in place
    assert "checkpoint at step 3: file:///c/job/ckpt3\n" in text
    assert "step 4/4 100%  loss 1.0000  eval loss 1.5000  ETA 00:00" in text
    # the failure: its message, the failed worker's last lines (rank 1's, not rank 0's), the log
    assert text.endswith("error: training failed: RuntimeError: boom on rank 1\n"
                         "last lines of worker rank 1 (pid 12):\n"
                         "  Traceback (most recent call last):\n"
                         "  RuntimeError: boom on rank 1\n"
                         "log: /logs/run.log\n"), text


def test_without_a_terminal_stdout_is_the_event_stream_and_people_read_stderr():
    console, out, err = _console(terminal=False)
    console.start()
    for line in FEED:
        console.feed(line + "\n")
    console.finish(1)
    events = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is JSON
    assert [e["event"] for e in events] == ["started", "progress", "checkpoint", "progress", "failed"]
    assert events[-1]["pid"] == 12 and events[3]["evalLoss"] == 1.5
    assert err.getvalue().splitlines()[:2] == ["log: /logs/run.log (--verbose shows it here)",
                                              "took over the stale lease on file:///c/job from host h, pid 1"]
    assert "last lines of worker rank 1 (pid 12):" in err.getvalue()


def test_verbose_shows_every_line_and_a_stop_is_one_line():
    console, out, err = _console(terminal=True, verbose=True)
    console.feed(FEED[2] + "\n")
    console.feed("finetune-train: stopped at step 3; rerun to resume from step 2\n")
    console.feed(format_event("failed", reason="Stopped", message="stopped at step 3; rerun to resume from step 2",
                              signal="SIGINT", step=3, resumeFromStep=2) + "\n")
    console.finish(130)
    assert out.getvalue() == (FEED[2] + "\n" + "finetune-train: stopped at step 3; rerun to resume from step 2\n"
                              "stopped at step 3; rerun to resume from step 2\n")  # verbose: the log's line too


def test_a_stop_is_one_line():
    console, out, err = _console(terminal=False)
    console.feed("finetune-train: stopped at step 3; rerun to resume from step 2\n")
    console.feed(format_event("failed", reason="Stopped", message="stopped at step 3; rerun to resume from step 2",
                              signal="SIGTERM", step=3, resumeFromStep=2) + "\n")
    console.finish(143)
    assert err.getvalue() == "stopped at step 3; rerun to resume from step 2\n"


def test_render_bar_without_total():
    assert "step 0/0" in render_bar({"step": 0})


def test_every_field_the_trainer_writes_is_documented():
    """The spec reference's event table (finetune_api.events.EVENTS) lists what the trainer
    really writes: every emit("kind", field=...) in its code."""
    import ast
    from pathlib import Path

    from finetune_api.events import EVENTS

    trainer = Path(__file__).resolve().parents[2] / "trainer_image" / "finetune_trainer"
    written: dict[str, set[str]] = {}
    for path in trainer.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and getattr(node.func, "id", getattr(node.func, "attr", "")).lstrip("_") in ("emit", "emit_fn"):
                written.setdefault(node.args[0].value, set()).update(k.arg for k in node.keywords if k.arg)
    assert set(written) == set(EVENTS), written
    for kind, fields in written.items():
        assert fields <= set(EVENTS[kind]), (kind, fields - set(EVENTS[kind]))
