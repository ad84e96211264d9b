"""`finetune make-tiny` + `finetune run` as the README's `make demo` runs them: in a terminal
(a pseudo-terminal, read as the screen a person sees)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_api.events import parse_events
from terminal import run_in_terminal, screen

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-cpu.yaml"
pytestmark = pytest.mark.training


def test_demo_in_a_terminal_shows_a_bar_our_lines_and_none_of_rays(ray_address, tmp_path):
    finetune = Path(sys.executable).with_name("finetune")
    made = subprocess.run([str(finetune), "make-tiny", ".demo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    job = yaml.safe_load(EXAMPLE.read_text())
    job["spec"]["training"]["maxSteps"] = 6  # the example's own 30 steps, shortened for CI
    job["spec"]["checkpoint"]["everySteps"] = 3
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = dict(os.environ, RAY_ADDRESS=ray_address, XDG_STATE_HOME=str(tmp_path / "state"), TERM="xterm")
    rc, raw = run_in_terminal([str(finetune), "run", "job.yaml"], tmp_path, env, timeout=600)
    lines = screen(raw)
    shown = "\n".join(lines)
    assert rc == 0, shown[-4000:]
    final = tmp_path / ".demo" / "checkpoints" / "tiny-cpu" / "final"
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()

    # What the screen holds: the log's path, the run, its checkpoints, the bar at its end, the model.
    assert lines[0].startswith("log: ") and lines[0].endswith(" (--verbose shows it here)"), shown
    log = Path(lines[0][len("log: "):].split(" (")[0])
    assert "training 6 steps on 2 worker(s), deepspeed" in lines, shown
    checkpoints = [line for line in lines if line.startswith("checkpoint at step ")]
    assert [c.split(":")[0] for c in checkpoints] == ["checkpoint at step 3", "checkpoint at step 6"], shown
    bar = [line for line in lines if "] step " in line]
    assert len(bar) == 1 and "step 6/6 100%" in bar[0] and "loss " in bar[0] and "tok/s" in bar[0], shown
    assert "\r\x1b[K[" in raw  # the bar was redrawn in place
    assert lines[-1].startswith("done in ") and lines[-1].endswith(
        f"final model: file://{final} ; loss curve: file://{final.parent}/loss-curve.png"), shown
    for internal in ("pid=", "Ray", "WARNING", "INFO", "Traceback", '{"event"', "stalled"):
        assert internal not in shown, (internal, shown)
    assert len(lines) <= 8, shown

    # Everything else is in the log: Ray's and the workers' lines and the events.
    text = log.read_text()
    assert "(RayTrainWorker pid=" in text
    progress = [e for e in parse_events(text.splitlines()) if e["event"] == "progress"]
    assert progress[-1]["step"] == 6 and progress[-1]["loss"] < progress[0]["loss"]
    print(f"the demo's screen ({len(lines)} lines):\n{shown}")
