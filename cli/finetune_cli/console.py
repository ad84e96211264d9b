"""What `finetune run` shows of its trainer's output, and where the rest goes.

Every line the trainer, Ray and the workers print goes to the log file. On the console:
- in a terminal: one live progress bar, the `started`, checkpoint and final-model lines, the
  trainer's notices (a lease taken over, leftovers removed: each once), and on failure the
  error, the last lines of the worker that failed and the log's path;
- otherwise (a pipe, CI, `--plain`): stdout is the JSON event stream only, one event per line
  without Ray's prefixes (finetune_api.events); the human lines go to stderr.
`--verbose` also shows every line of the log as it comes.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import TextIO

from finetune_api.events import parse_event_line
from finetune_api.status import Reason

from .progress_bar import ProgressBar, eval_loss_of

# Ray puts "(RayTrainWorker pid=12, ip=10.0.0.1) " before every line a worker prints, and
# colours it when it writes to a terminal.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\((?P<who>[^()\s]+) pid=(?P<pid>\d+)(?:, ip=[^)]*)?\) ?")
# The trainer's own lines for people start with this; the ones below it shows as events.
OWN = "finetune-train: "
SHOWN_AS_EVENTS = ("error: ", "stopped at step ", "checkpoint at step ")
TAIL_LINES = 15


def split_prefix(line: str) -> tuple[int | None, str]:
    """The pid of Ray's prefix (None for the driver's own lines) and the line without it."""
    text = _ANSI.sub("", line).rstrip("\n")
    match = _RAY_PREFIX.match(text)
    if match is None:
        return None, text
    return int(match.group("pid")), text[match.end():]


class Console:
    def __init__(self, out: TextIO, err: TextIO, *, terminal: bool, verbose: bool, log_path: str):
        self.out, self.err = out, err
        self.bar = ProgressBar(out) if terminal else None
        self.verbose = verbose
        self.log_path = log_path
        self.tails: dict[int | None, deque[str]] = {}
        self.shown: set[str] = set()
        self.failed: dict | None = None
        self.completed = False

    # --- what people read ------------------------------------------------------------------

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.print(text)
        else:
            self.err.write(text + "\n")
            self.err.flush()

    def notice(self, text: str) -> None:
        if text not in self.shown:
            self.shown.add(text)
            self.say(text)

    def start(self) -> None:
        self.say(f"log: {self.log_path}" + ("" if self.verbose else " (--verbose shows it here)"))

    # --- the trainer's output --------------------------------------------------------------

    def feed(self, line: str) -> None:
        pid, text = split_prefix(line)
        event = parse_event_line(text)
        if event is not None:
            self._event(event)
            return
        if not text.strip():
            return
        self.tails.setdefault(pid, deque(maxlen=TAIL_LINES)).append(text)
        if self.verbose:
            self.say(line.rstrip("\n"))
        elif text.startswith(OWN) and not text[len(OWN):].startswith(SHOWN_AS_EVENTS):
            self.notice(text[len(OWN):])

    def _event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "failed":
            self.failed = event
        elif kind == "completed":
            self.completed = True
        if self.bar is None:
            self.out.write(json.dumps(event) + "\n")
            self.out.flush()
            return
        eval_loss = eval_loss_of(event)
        if eval_loss is not None:
            self.bar.note_eval_loss(eval_loss)
        if kind == "progress":
            self.bar.draw(event)
        elif kind == "started":
            resumed = event.get("resumedFromStep")
            self.say(f"training {event.get('totalSteps')} steps on {event.get('workers')} worker(s), "
                     f"{event.get('strategy')}" + (f", resumed from step {resumed}" if resumed else ""))
        elif kind == "checkpoint":
            self.say(f"checkpoint at step {event.get('step')}: {event.get('uri')}")
        elif kind == "completed":
            self.bar.close()

    # --- the end ---------------------------------------------------------------------------

    def finish(self, code: int) -> None:
        """After the trainer exited with `code`: what went wrong, where to read more."""
        if self.bar is not None:
            self.bar.close()
        if code == 0:
            return
        failed = self.failed
        if failed is not None and failed.get("reason") == Reason.STOPPED:
            self.say(failed.get("message", "stopped"))
            return
        if failed is not None:
            self.say(f"error: {failed.get('message', '')}")
        else:
            self.say(f"error: the trainer exited with code {code}")
        pid = failed.get("pid") if failed else None
        tail, whose = self._tail_of(pid, failed.get("rank") if failed else None)
        if tail:
            self.say(f"last lines of {whose}:")
            for text in tail:
                self.say(f"  {text}")
        self.say(f"log: {self.log_path}")

    def _tail_of(self, pid: int | None, rank: int | None) -> tuple[list[str], str]:
        if pid is not None and self.tails.get(pid):
            who = f"worker rank {rank} (pid {pid})" if rank is not None else f"pid {pid}"
            return list(self.tails[pid]), who
        own = [t for t in self.tails.get(None, ()) if not t.startswith(OWN + "error: ")]
        return own, "the trainer"
