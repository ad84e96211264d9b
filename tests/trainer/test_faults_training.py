"""Real runs (2 CPU workers, moto S3) under injected faults: S3 connection resets during a
checkpoint upload (through the fault proxy, fault_proxy.py), and two runs of one job.

- 2 s of resets during the first checkpoint's upload: the run rides them out.
- One worker's uploads reset for 20 s with spec.s3.maxAttempts 2: the run fails in one line
  naming the operation and the key; the other rank's files, a partial checkpoint, are in the
  bucket; the rerun never uses them (it starts at step 0), removes them, and completes.
- Two runs of one job: the second is refused naming the first; after the first is killed
  (SIGKILL) the second takes its lease over and resumes from its checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml

from finetune_api.events import parse_event_line, parse_events

pytestmark = pytest.mark.training


def _keys_under(s3_server, uri: str) -> list[str]:
    return s3_server.keys(uri[len(f"s3://{s3_server.bucket}/"):].rstrip("/") + "/")


def test_checkpoint_upload_rides_out_two_seconds_of_resets(make_job, run_trainer, s3_server, s3_proxy,
                                                           complete_in_bucket):
    job = make_job("resets-2s", {"training": {"maxSteps": 4}, "checkpoint": {"everySteps": 2},
                                 "s3": {"endpoint": s3_proxy.endpoint}})
    s3_proxy.arm(rb"PUT /[^ ]*/checkpoint_step00000002_", 2.0)
    run = run_trainer(job)
    assert run.rc == 0, run.explain()
    assert s3_proxy.triggered_at is not None and s3_proxy.resets >= 1, "the outage never hit an upload"
    assert [e["step"] for e in run.of("checkpoint")] == [2, 4]
    for event in run.of("checkpoint"):
        assert complete_in_bucket(event["uri"]) == 2
    print(f"rode out the outage: {s3_proxy.resets} connections reset")


def test_long_upload_outage_fails_in_one_line_and_the_partial_checkpoint_is_removed(
        make_job, run_trainer, s3_server, s3_proxy):
    spec = {"training": {"maxSteps": 4}, "checkpoint": {"everySteps": 2},
            "s3": {"endpoint": s3_proxy.endpoint, "maxAttempts": 2}}
    job = make_job("resets-20s", spec)
    # rank 1's uploads of the step-2 checkpoint are reset for 20 s; rank 0's go through
    s3_proxy.arm(rb"PUT /[^ ]*/checkpoint_step00000002_[^ ]*(rank_1_|rank1\.json)", 20.0, selective=True)
    failed = run_trainer(job)
    assert failed.rc == 1, failed.explain()
    # the trainer's verdict: one line (Ray's controller logs its own traceback above it)
    lines = [line for line in failed.stderr.splitlines() if line.startswith("finetune-train: error: ")]
    assert len(lines) == 1, failed.explain()
    assert re.search(rf"S3 upload of s3://{s3_server.bucket}/runs-\w+/resets-20s/checkpoint_step00000002_[-\w]+/"
                     r"\S*rank_?1\S* failed after up to 2 attempts per request: \w+Error", lines[0]), lines[0]
    assert "cannot pickle" not in failed.stdout + failed.stderr
    assert not failed.of("checkpoint") and not failed.of("completed")
    run_uri = job["spec"]["checkpoint"]["uri"] + "/resets-20s"
    partial = sorted({k.split("/")[2] for k in _keys_under(s3_server, run_uri) if "/checkpoint_step" in k})
    assert len(partial) == 1 and partial[0].startswith("checkpoint_step00000002_"), partial
    assert any(k.endswith("trainer_state_rank0.json") for k in _keys_under(s3_server, f"{run_uri}/{partial[0]}"))

    s3_proxy.wait_until_up()
    rerun = run_trainer(job)
    assert rerun.rc == 0, rerun.explain()
    assert rerun.of("started")[0]["resumedFromStep"] == 0  # the partial checkpoint was not used
    assert f"removed {run_uri}/{partial[0]}: never registered" in rerun.stdout, rerun.explain()
    assert not _keys_under(s3_server, f"{run_uri}/{partial[0]}")
    assert [e["step"] for e in rerun.of("checkpoint")] == [2, 4]


class _Background:
    """A trainer run in the background; its stdout read line by line."""

    def __init__(self, cmd, env):
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_event(self, kind: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                event = parse_event_line(line)
                if event and event["event"] == kind:
                    return event
            assert self.proc.poll() is None, "".join(self.lines)[-4000:]
            time.sleep(0.2)
        raise AssertionError(f"no {kind} event in {timeout}s:\n" + "".join(self.lines)[-4000:])


def test_second_run_is_refused_then_takes_over_when_the_first_is_killed(make_job, run_trainer, ray_address,
                                                                        tmp_path):
    job = make_job("two-runs", {"training": {"maxSteps": 60, "epochs": 5}, "checkpoint": {"everySteps": 4}})
    path = tmp_path / "two-runs.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_address}
    first = _Background([sys.executable, "-m", "finetune_trainer", "--job", str(path)], env)
    try:
        first.wait_for_event("checkpoint", timeout=400)
        refused = run_trainer(job, timeout=120)
        assert refused.rc == 1, refused.explain()
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "in use by another run of this job" in lines[0], refused.explain()
        assert f"pid {first.proc.pid}," in lines[0] and "attempt " in lines[0] and "since " in lines[0], lines[0]
        assert not refused.of("started")
        assert first.proc.poll() is None, "the refused run disturbed the first one"
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)  # the CLI and everything it started, no clean-up
        first.proc.wait()
    checkpointed = [e["step"] for e in parse_events(first.lines) if e["event"] == "checkpoint"]
    assert checkpointed, "".join(first.lines)[-3000:]

    second = run_trainer(job, timeout=600)
    assert second.rc == 0, second.explain()
    assert re.search(rf"took over the stale lease on \S+/two-runs from host \S+, pid {first.proc.pid}, "
                     rf"attempt \S+, since \S+ \(process {first.proc.pid} on this machine is gone\)",
                     second.stdout), second.explain()
    resumed = second.of("started")[0]["resumedFromStep"]
    assert resumed >= checkpointed[-1] and resumed % 4 == 0, (resumed, checkpointed)
    assert second.of("completed")[0]["step"] == 60
