"""Rank 0's progress events: one JSON line each, flushed, for the driver log."""

from __future__ import annotations

import math
import sys
import time

from finetune_api.events import format_event

# At most this many progress lines per second for very fast steps; the last step, the
# first step and checkpoint steps are always printed.
MAX_LINES_PER_SECOND = 2.0


def emit(kind: str, **fields) -> None:
    # NaN/inf cannot be JSON; a diverged loss is reported as null rather than crashing.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
    sys.stdout.write(format_event(kind, **clean) + "\n")
    sys.stdout.flush()


def say(text: str) -> None:
    """A human line in the worker log. sys.stdout.write, not print: Ray Train patches
    print() in workers to also log it, which would show every line twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class ProgressReporter:
    def __init__(self, total_steps: int, start_step: int, tokens_per_step: int):
        self.total = total_steps
        self.start_step = start_step
        self.tokens_per_step = tokens_per_step
        self.t0 = time.monotonic()
        self.last_print = 0.0
        self.last_print_step = start_step
        self.last_print_time = self.t0

    def step(self, step: int, epoch: int, loss: float, lr: float, force: bool = False) -> None:
        now = time.monotonic()
        due = force or step == self.total or step == self.start_step + 1 or \
            now - self.last_print >= 1.0 / MAX_LINES_PER_SECOND
        if not due:
            return
        done = step - self.start_step
        per_step = (now - self.t0) / max(done, 1)
        window = max(now - self.last_print_time, 1e-9)
        tps = (step - self.last_print_step) * self.tokens_per_step / window
        emit("progress", step=step, totalSteps=self.total, epoch=epoch, loss=round(loss, 6),
             learningRate=lr, tokensPerSecond=round(tps, 1),
             etaSeconds=int(round(per_step * (self.total - step))))
        self.last_print = now
        self.last_print_step = step
        self.last_print_time = now
