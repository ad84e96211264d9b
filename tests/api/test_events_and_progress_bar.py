"""The trainer's event lines, read back through Ray's log prefixes, and the terminal bar."""

from __future__ import annotations

import io

import pytest

from finetune_api.events import format_event, parse_event_line, parse_events
from finetune_cli.progress_bar import ProgressBar, render_bar


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


def test_bar_draws_progress_in_place_and_keeps_other_lines():
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.feed(format_event("started", totalSteps=4, resumedFromStep=2, workers=2,
                          strategy="deepspeed") + "\n")
    bar.feed("(RayTrainWorker pid=1) some log line\n")
    bar.feed(format_event("progress", step=3, totalSteps=4, loss=1.25, tokensPerSecond=1000.0,
                          etaSeconds=65) + "\n")
    bar.feed(format_event("progress", step=4, totalSteps=4, loss=1.0, etaSeconds=0) + "\n")
    bar.close()
    text = out.getvalue()
    assert "resumed from step 2" in text
    assert "some log line\n" in text
    assert "step 3/4  75%" in text and "loss 1.2500" in text and "1,000 tok/s" in text
    assert "ETA 01:05" in text
    assert "\r\033[K[" in text  # redrawn in place
    assert text.endswith("step 4/4 100%  loss 1.0000  ETA 00:00\n")


def test_render_bar_without_total():
    assert "step 0/0" in render_bar({"step": 0})
