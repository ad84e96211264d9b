"""`finetune make-tiny` + `finetune run` as the README's `make demo` runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_api.events import parse_events

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-cpu.yaml"
pytestmark = pytest.mark.training


def test_demo_job_runs_from_relative_paths_and_says_where_the_model_is(ray_address, tmp_path):
    finetune = Path(sys.executable).with_name("finetune")
    made = subprocess.run([str(finetune), "make-tiny", ".demo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    job = yaml.safe_load(EXAMPLE.read_text())
    job["spec"]["training"]["maxSteps"] = 6  # the example's own 30 steps, shortened for CI
    job["spec"]["checkpoint"]["everySteps"] = 3
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    run = subprocess.run([str(finetune), "run", "job.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    final = tmp_path / ".demo" / "checkpoints" / "tiny-cpu" / "final"
    assert f"final model: file://{final}" in output
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()
    events = parse_events(output.splitlines())
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["step"] == 6 and progress[-1]["loss"] < progress[0]["loss"]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [3, 6]
