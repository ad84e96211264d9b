"""The trainer reads its job (--job FILE, or FINETUNE_JOB) as kubectl would have read it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from finetune_trainer.entrypoint import load_job

JOB = """\
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: x}
spec:
  model: {uri: "file:///m"}
  dataset: {uri: "file:///d"}
  checkpoint: {uri: "file:///c"}
  training:
    learningRate: 3e-3
    maxSteps: 1e3
"""


def test_a_job_file_s_numbers_read_as_kubectl_reads_them(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB)
    job = load_job(argparse.Namespace(job=str(path)))
    assert job.spec.training.learning_rate == 0.003
    assert job.spec.training.max_steps == 1000 and isinstance(job.spec.training.max_steps, int)


def test_finetune_job_env_with_a_duplicate_key_exits_2_in_one_line(tmp_path):
    doc = JOB.replace("maxSteps: 1e3", "maxSteps: 1e3\n    maxSteps: 5")
    env = {"FINETUNE_JOB": doc, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    failed = [json.loads(line) for line in proc.stdout.splitlines() + proc.stderr.splitlines()
              if line.startswith('{"event": "failed"')]
    assert failed and failed[0]["reason"] == "InvalidJob"
    assert "FINETUNE_JOB#1: spec.training.maxSteps: duplicate key 'maxSteps'" in \
        failed[0]["message"]
    assert "Traceback" not in proc.stderr
