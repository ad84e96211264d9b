"""The trainer's error types and the exit codes they map to.

The CLI and the operator read the exit code to tell a job that can never work (bad spec, bad
input: do not retry) from one that failed while training (retry from the last checkpoint).
The codes, their reasons and whether a retry helps are the contract's (finetune_api.status).
"""

from __future__ import annotations

from finetune_api.status import Exit

EXIT_OK = Exit.OK.code
EXIT_TRAINING_FAILED = Exit.TRAINING_FAILED.code
EXIT_INVALID_JOB = Exit.INVALID_JOB.code
EXIT_BAD_INPUT = Exit.BAD_INPUT.code


class TrainerError(Exception):
    """An error with a one-line message meant for people; never shown with a traceback."""

    reason = Exit.TRAINING_FAILED.reason
    exit_code = EXIT_TRAINING_FAILED


class InvalidJobError(TrainerError):
    reason = Exit.INVALID_JOB.reason
    exit_code = EXIT_INVALID_JOB


class BadInputError(TrainerError):
    """Missing bucket, model or dataset, unreadable data, GPUs asked for but absent..."""

    reason = Exit.BAD_INPUT.reason
    exit_code = EXIT_BAD_INPUT


class InjectedFault(RuntimeError):
    """Raised by the FINETUNE_FAULT_AFTER_STEP test hook (see train_loop)."""


class StorageError(TrainerError):
    """S3 or disk I/O that failed for good (retries spent, disk full, permission denied): one
    line naming the operation, the object or path, and the underlying error. Picklable, unlike
    botocore's exceptions, so it crosses from a Ray worker to the driver. A rerun may succeed,
    so it keeps TrainingFailed's exit code."""


class WorkerError(TrainerError):
    """A worker's exception that cannot be pickled (so cannot reach the driver as itself),
    carried as its type and one-line message."""


class WorkerDiedError(TrainerError):
    """A training process that died rather than raised: killed (SIGKILL, the kernel's OOM
    killer, Ray's memory monitor) or crashed. Named by its rank and pid, with Ray's account
    of the exit, since the other ranks only see their connection to it reset."""

    def __init__(self, message: str, rank: int | None = None, pid: int | None = None):
        super().__init__(message)
        self.rank, self.pid = rank, pid

    def __reduce__(self):
        return (type(self), (str(self), self.rank, self.pid))

    @classmethod
    def of(cls, rank: int, died: BaseException) -> "WorkerDiedError":
        """From Ray's ActorDiedError, whose text holds the pid and the exit's type and detail."""
        import re

        text = str(died)
        pid_match = re.search(r"\bpid: (\d+)", text)
        pid = int(pid_match.group(1)) if pid_match else None
        detail = re.search(r"Worker exit type: (\S+)\s+Worker exit detail: (.*)", text, re.S)
        if detail:
            account = f"{detail.group(1)}: {' '.join(detail.group(2).split())}"
        else:
            account = " ".join(text.split())
        who = f"worker rank {rank}" + (f" (pid {pid})" if pid else "")
        return cls(f"{who} died: {account[:400]}", rank, pid)
