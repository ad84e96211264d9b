"""Stopping on a signal: SIGINT (Ctrl-C), SIGTERM (`kill`, a pod's deletion, preemption) and
the death of the `finetune run` that started the trainer.

The first signal stops training through Ray Train's own abort (the controller kills its
worker group; a checkpoint whose upload is in flight is never registered, so a rerun never
uses it and removes it, cleanup.py), then the driver shuts its Ray down, prints one line
("stopped at step N; rerun to resume from step M") and exits 128 + the signal (130, 143;
finetune_api.status.Exit). A second signal stops at once, without waiting for the abort (Ray's
shutdown still runs; signals after that are ignored).

Ray Train registers a SIGINT handler of its own inside `fit()` (its abort, SIGINT only);
`StoppableTrainer` puts ours there instead, for both signals.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
import threading
from typing import Callable

from finetune_api.events import parse_event_line
from finetune_api.status import PARENT_PID_ENV

# PARENT_PID_ENV: set by `finetune run` to its pid; the trainer asks the kernel for SIGTERM when
# that parent dies (SIGKILL included), and so stops as on any SIGTERM instead of training on
# as an orphan.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ABORT_TIMEOUT_S = 60  # for the controller to kill its workers; a hung one is left to Ray's shutdown
_PR_SET_PDEATHSIG = 1
_STEP_IN_NAME = re.compile(r"^checkpoint_step(\d+)_")


class Stopped(BaseException):
    """Raised in the driver's main thread on a stop signal. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    signum: int | None = None
    abort: Callable[[], None] | None = None  # Ray Train's abort, while fit() runs


_state = _State()


def _on_signal(signum: int, frame) -> None:
    first = _state.signum is None
    if first:
        _state.signum = signum
    abort = _state.abort
    if first and abort is not None:
        _state.abort = None
        abort()
    raise Stopped(_state.signum)


def install() -> None:
    """Our handlers for SIGINT and SIGTERM, and the parent-death signal when `finetune run`
    started us. Only from the main thread (Python runs signal handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state.signum, _state.abort = None, None
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    parent = os.environ.get(PARENT_PID_ENV)
    if parent and parent.isdigit():
        _die_with_parent(int(parent))


def requested() -> int | None:
    """The stop signal received, if one was."""
    return _state.signum


def take_back() -> None:
    """Our handlers again, after `ray.init`: Ray's core worker installs its own failure-signal
    handler for SIGTERM in the driver (it prints "*** SIGTERM received" and aborts, exit 134)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_signal)


def shield() -> None:
    """Further signals are ignored: the stop is under way, and Ray's shutdown (which kills
    Ray's processes itself) must not be cut short and leave them behind."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def stoppable_trainer(trainer_cls):
    """`trainer_cls` (a Ray Train trainer) with our stop handler in place of Ray's SIGINT one."""
    import ray

    class StoppableTrainer(trainer_cls):
        def _register_sigint_handler(self, controller) -> None:  # called by fit(), main thread
            def abort() -> None:
                try:
                    ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # abort ends with the controller's exit_actor(): its call "fails"

            _state.abort = abort

    StoppableTrainer.__name__ = StoppableTrainer.__qualname__ = trainer_cls.__name__
    return StoppableTrainer


def fit_done() -> None:
    _state.abort = None


class StepWatch:
    """The last step rank 0 reported (its `started` and `progress` events), read from the
    worker output Ray forwards to the driver: where a stop happened."""

    def __init__(self) -> None:
        self.step = 0

    def feed(self, line: str) -> None:
        event = parse_event_line(line)
        if event is None:
            return
        if event["event"] == "started":
            self.step = max(self.step, int(event.get("resumedFromStep") or 0))
        elif event["event"] in ("progress", "checkpoint") and isinstance(event.get("step"), int):
            self.step = max(self.step, event["step"])

    def attach(self) -> None:
        """Listen to the worker output Ray forwards to this driver (log_to_driver)."""
        try:
            from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return

        def handle(data: dict) -> None:
            for line in data.get("lines") or ():
                self.feed(line)

        dispatcher.add_handler("finetune_step_watch", handle)


def resume_step(run_loc) -> int:
    """The step a rerun resumes from: that of the latest checkpoint Ray Train registered for
    the run (its checkpoint_manager_snapshot.json); 0 when there is none or it is unreadable."""
    from .cleanup import SNAPSHOT_FILE

    try:
        with run_loc.filesystem.open_input_stream(f"{run_loc.path}/{SNAPSHOT_FILE}") as f:
            doc = json.loads(f.read().decode())
        results = list(doc.get("checkpoint_results") or [])
        if doc.get("latest_checkpoint_result"):
            results.append(doc["latest_checkpoint_result"])
        steps = [int(m.group(1)) for r in results
                 if (m := _STEP_IN_NAME.match(r.get("checkpoint_dir_name") or ""))]
        return max(steps, default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0
