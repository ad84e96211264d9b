"""`finetune run JOB`: the trainer as a child process that `finetune run` owns.

- Its output (the trainer's, Ray's, the workers') goes to a log file and through the console
  (console.py): a progress bar in a terminal, the JSON event stream otherwise.
- It runs in a session of its own, so a Ctrl-C in the terminal reaches `finetune run` alone,
  which hands SIGINT/SIGTERM on to it: the trainer stops through Ray Train's abort and shuts
  its Ray down (finetune_trainer.stopping), and `finetune run` exits with its code (130, 143).
- Should `finetune run` itself be killed, the kernel sends the trainer SIGTERM (the trainer
  asks for it, given our pid in FINETUNE_PARENT_PID), and it stops the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from finetune_api.status import JOB_ENV, PARENT_PID_ENV

from .console import Console
from .jobs import load_jobs_or_exit

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def default_log_path(name: str) -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(state) / "finetune" / "logs" / f"{name}-{stamp}-{os.getpid()}.log"


def cmd_run(args: argparse.Namespace) -> int:
    # Fail fast, before any Ray start, on an invalid file.
    ((source, job),) = load_jobs_or_exit([args.job], one=True)
    command = [sys.executable, "-m", "finetune_trainer"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[PARENT_PID_ENV] = str(os.getpid())
    if len(source.documents) == 1:
        command += ["--job", args.job]
    else:  # the job shares its file with other documents (a Secret): hand over the job alone
        env[JOB_ENV] = json.dumps(job.document)
    if args.fresh:
        command.append("--fresh")
    if args.address:
        env["RAY_ADDRESS"] = args.address
    log_path = Path(args.log_file) if args.log_file else default_log_path(job.document["metadata"]["name"])
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")
    except OSError as exc:
        print(f"finetune run: error: cannot write the log file {log_path}: {exc.strerror}", file=sys.stderr)
        return 1
    terminal = sys.stdout.isatty() and not args.plain
    console = Console(sys.stdout, sys.stderr, terminal=terminal, verbose=args.verbose, log_path=str(log_path))
    with log:
        return supervise(command, env, console, log)


def supervise(command: list[str], env: dict[str, str], console: Console, log) -> int:
    console.start()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1, errors="replace",
                            start_new_session=True)
    received: list[int] = []

    def forward(signum, frame) -> None:
        # SIGHUP (the terminal closed) stops like SIGTERM; a second signal stops at once.
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        if not received:
            console.say("stopping: Ray Train is shutting the workers down "
                        "(again to stop at once)" if console.bar is not None else "stopping")
        received.append(sent)
        try:
            proc.send_signal(sent)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            console.feed(line)
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code < 0:  # the trainer itself died of a signal
        code = 128 - code
    console.finish(code)
    return code
