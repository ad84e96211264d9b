"""`finetune run` under signals, and a worker the system kills, as a user meets them: real
runs of one job (2 CPU workers, moto S3 behind the fault proxy), through a pipe, each one
interrupted from here, each the rerun of the one before:

1. SIGTERM while a checkpoint upload is in flight: exit 143, the one line, and no process of
   the run left (the trainer, Ray Train's controller and workers);
2. SIGINT during training: exit 130; it resumed from the last complete checkpoint, not from
   the one whose upload was cut off;
3. SIGKILL of `finetune run`: its trainer notices, stops and leaves nothing;
4. SIGKILL of one worker (as the OOM killer would): the verdict names that rank and pid, not
   the other rank's "Connection reset by peer", and shows that worker's last lines;
5. its own Ray (no RAY_ADDRESS), SIGTERM: nothing of that Ray left (GCS, raylet, agents,
   workers); its log holds Ray's output, with no "Found multiple active Ray instances"
   although the session's Ray runs here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.training

FINETUNE = str(Path(sys.executable).with_name("finetune"))
JOB_ACTORS = ("ray::RayTrainWorker", "ray::TrainController")


class Cli:
    """`finetune run JOB` in the background through pipes, as CI or a script runs it."""

    def __init__(self, job_path: Path, env: dict):
        self.proc = subprocess.Popen([FINETUNE, "run", str(job_path)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, into), daemon=True)
                         for s, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, into):
        for line in stream:
            into.append(line)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.out)]  # every stdout line is an event

    def wait_for(self, predicate, what: str, timeout: float = 400) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            assert self.proc.poll() is None, f"exited before {what}:\n{self.explain()}"
            time.sleep(0.2)
        raise AssertionError(f"no {what} in {timeout}s:\n{self.explain()}")

    def finish(self, timeout: float = 180) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def stderr_lines(self) -> list[str]:
        return [line.rstrip("\n") for line in self.err if line.strip()]

    def log_path(self) -> Path:
        first = self.stderr_lines()[0]
        assert first.startswith("log: "), first
        return Path(first[len("log: "):].split(" (")[0])

    def explain(self) -> str:
        return "--- stdout\n" + "".join(self.out)[-3000:] + "--- stderr\n" + "".join(self.err)[-3000:]


def job_actors() -> dict[int, str]:
    """The Ray Train processes (controller, workers) of the session's Ray, started by this process."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith(JOB_ACTORS) and p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = p.name()
        except psutil.NoSuchProcess:
            pass
    return out


def alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return left


def wait_gone(procs: list[psutil.Process], timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive(procs)


def stop_line(cli: Cli) -> re.Match:
    lines = [line for line in cli.stderr_lines() if line.startswith("stopped at step")]
    assert len(lines) == 1, cli.explain()
    match = re.fullmatch(r"stopped at step (\d+); rerun to resume from step (\d+)", lines[0])
    assert match, lines[0]
    return match


def test_signals_stop_the_run_cleanly_and_the_rerun_resumes_and_a_killed_worker_is_named(
        make_job, s3_server, s3_proxy, ray_address, tmp_path):
    job = make_job("stops", {"training": {"maxSteps": 40, "epochs": 5}, "checkpoint": {"everySteps": 4},
                             "s3": {"endpoint": s3_proxy.endpoint}})
    path = tmp_path / "stops.yaml"
    path.write_text(yaml.safe_dump(job))
    own_ray = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    own_ray["XDG_STATE_HOME"] = str(tmp_path / "state")
    joined = {**own_ray, "RAY_ADDRESS": ray_address}
    before = job_actors()

    def new_actors() -> list[psutil.Process]:
        return [psutil.Process(pid) for pid in set(job_actors()) - set(before)]

    # 1. SIGTERM while the step-8 checkpoint's upload is held up: that checkpoint never counts.
    s3_proxy.arm(rb"PUT /[^ ]*/checkpoint_step00000008_", 300.0, selective=True)
    first = Cli(path, joined)
    first.wait_for(lambda e: e["event"] == "checkpoint" and e["step"] == 4, "the step-4 checkpoint")
    deadline = time.monotonic() + 300
    while s3_proxy.triggered_at is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert s3_proxy.triggered_at is not None, first.explain()
    procs = psutil.Process(first.proc.pid).children() + new_actors()
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 143, first.explain()
    assert not wait_gone(procs), f"left behind: {alive(procs)}"
    step, resume = map(int, stop_line(first).groups())
    assert step >= 8 and resume == 4, first.explain()
    stopped = first.events()[-1]
    assert stopped["event"] == "failed" and stopped["reason"] == "Stopped" and stopped["signal"] == "SIGTERM"
    assert not any(e["event"] == "checkpoint" and e["step"] == 8 for e in first.events())
    s3_proxy.heal()

    # 2. SIGINT during training: the rerun resumed from step 4, not from the cut-off upload.
    second = Cli(path, joined)
    started = second.wait_for(lambda e: e["event"] == "started", "started")
    assert started["resumedFromStep"] == 4, second.explain()
    second.wait_for(lambda e: e["event"] == "progress", "a progress event")
    procs = psutil.Process(second.proc.pid).children() + new_actors()
    second.proc.send_signal(signal.SIGINT)
    assert second.finish() == 130, second.explain()
    step, resume = map(int, stop_line(second).groups())
    assert step > 4 and resume >= 4, second.explain()
    assert second.events()[-1]["signal"] == "SIGINT"
    assert not wait_gone(procs), f"left behind: {alive(procs)}"

    # 3. SIGKILL of `finetune run`: its trainer stops by itself, and so do the workers.
    third = Cli(path, joined)
    started = third.wait_for(lambda e: e["event"] == "started", "started")
    assert started["resumedFromStep"] == resume, third.explain()
    third.wait_for(lambda e: e["event"] == "progress", "a progress event")
    trainer, actors = psutil.Process(third.proc.pid).children(), new_actors()
    assert trainer and actors
    third.proc.kill()
    third.finish()
    assert not wait_gone(trainer + actors, timeout=120), f"left behind: {alive(trainer + actors)}"

    # 4. One worker killed by the system: it is the cause, with its last lines.
    fourth = Cli(path, joined)
    started = fourth.wait_for(lambda e: e["event"] == "started", "started")
    assert started["resumedFromStep"] >= resume, fourth.explain()
    fourth.wait_for(lambda e: e["event"] == "progress", "a progress event")
    log_path = fourth.log_path()
    # Ray Train's controller lists its workers: "- (ip=10.0.0.1, pid=123) world_rank=1, ..."
    victims = [int(m) for m in re.findall(r"pid=(\d+)\) world_rank=1\b", log_path.read_text())]
    workers = [p.pid for p in new_actors() if p.name().startswith("ray::RayTrainWorker")]
    assert len(victims) == 1 and victims[0] in workers, (victims, workers)
    os.kill(victims[0], signal.SIGKILL)
    assert fourth.finish() == 1, fourth.explain()
    failed = fourth.events()[-1]
    assert failed["event"] == "failed" and failed["reason"] == "TrainingFailed", failed
    assert failed["rank"] == 1 and failed["pid"] == victims[0], failed
    assert failed["message"].startswith(f"training failed: worker rank 1 (pid {victims[0]}) died: "), failed
    assert "Connection reset by peer" not in failed["message"]
    err = fourth.stderr_lines()
    assert f"last lines of worker rank 1 (pid {victims[0]}):" in err and err[-1] == f"log: {log_path}", \
        fourth.explain()

    # 5. A Ray of its own (the session's Ray runs on this machine too), SIGTERM: no process
    # of it is left (GCS, raylet, agents, workers), and Ray never searched for other instances.
    fifth = Cli(path, own_ray)
    started = fifth.wait_for(lambda e: e["event"] == "started", "started")
    assert started["resumedFromStep"] >= resume, fifth.explain()
    fifth.wait_for(lambda e: e["event"] == "progress", "a progress event")
    tree = psutil.Process(fifth.proc.pid).children(recursive=True)
    names = {p.name() for p in tree}
    assert {"raylet", "gcs_server", "ray::RayTrainWorker"} <= names, names
    fifth.proc.send_signal(signal.SIGTERM)
    assert fifth.finish() == 143, fifth.explain()
    assert not wait_gone(tree, timeout=30), f"left behind: {alive(tree)}"
    stop_line(fifth)
    log = fifth.log_path().read_text()
    assert "(RayTrainWorker pid=" in log and "Found multiple active Ray instances" not in log
    print(f"stops: {stop_line(first).groups()}, {stop_line(second).groups()}, {stop_line(fifth).groups()}; "
          f"dead worker: {failed['message']}")
