"""`finetune run JOB`: the trainer as a child process, with a live progress bar in a terminal."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from finetune_api.status import JOB_ENV

from .jobs import load_jobs_or_exit
from .progress_bar import ProgressBar


def cmd_run(args: argparse.Namespace) -> int:
    # Fail fast, before any Ray start, on an invalid file.
    ((source, job),) = load_jobs_or_exit([args.job], one=True)
    command = [sys.executable, "-m", "finetune_trainer"]
    env = dict(os.environ)
    if len(source.documents) == 1:
        command += ["--job", args.job]
    else:  # the job shares its file with other documents (a Secret): hand over the job alone
        env[JOB_ENV] = json.dumps(job.document)
    if args.fresh:
        command.append("--fresh")
    if args.address:
        env["RAY_ADDRESS"] = args.address
    if sys.stdout.isatty() and not args.plain:
        return run_with_progress_bar(command, env)
    return subprocess.call(command, env=env)


def run_with_progress_bar(command: list[str], env: dict[str, str]) -> int:
    """In a terminal, the trainer's JSON events become a live bar; other lines still show."""
    bar = ProgressBar(sys.stdout)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            bar.feed(line)
    except KeyboardInterrupt:
        proc.terminate()
    bar.close()
    return proc.wait()
