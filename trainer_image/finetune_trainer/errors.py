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
