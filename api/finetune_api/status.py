"""The status vocabulary: every word a FineTuneJob's status and Events use, in one place.

Phases, condition types and reasons (each with the one line the spec reference prints), the
trainer's exit codes and whether a retry can help, and the names the operator and the trainer
share (the job's environment variable, the S3 Secret's keys). The schema (the phase enum, the
condition types' description), the generated docs, the operator and the trainer take them
from here; `tests/api/test_status_vocabulary.py` fails when a document names a word that is
not here or the operator sets a reason that is not.

To add a phase, a condition type or a reason: one line here, then the code that uses it
(and `make crds`, which regenerates the CRD and the spec reference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class Vocabulary:
    """Words of one kind. Each is written `NAME = "Word", "what it means"`; the class turns it
    into the plain string "Word" and keeps the meaning in `meanings` (the docs print it)."""

    meanings: dict[str, str] = {}

    def __init_subclass__(cls) -> None:
        cls.meanings = {}
        for name, value in list(vars(cls).items()):
            if name.isupper() and isinstance(value, tuple):
                word, meaning = value
                if word in cls.meanings:
                    raise ValueError(f"{cls.__name__}: {word!r} twice")
                setattr(cls, name, word)
                cls.meanings[word] = meaning

    @classmethod
    def words(cls) -> tuple[str, ...]:
        """The words, in the order they are written."""
        return tuple(cls.meanings)


class Phase(Vocabulary):
    """status.phase: where the job is in its life."""
    PENDING = "Pending", "Accepted; no RayCluster yet (waiting for the S3 Secret, if any)."
    PROVISIONING = "Provisioning", (
        "The RayCluster is being created and started, the trainer submitted.")
    RUNNING = "Running", "The trainer runs on the RayCluster."
    RETRYING = "Retrying", (
        "An attempt failed or lost its RayCluster; the next resumes from the latest checkpoint.")
    SUSPENDED = "Suspended", "runPolicy.suspend: the Ray job is stopped and the RayCluster deleted."
    SUCCEEDED = "Succeeded", ("Training finished; status.output.modelUri is the model "
                              "(with spec.adapter: adapterUri the adapter, modelUri the merged model).")
    FAILED = "Failed", (
        "Ended without a model: backoff limit, deadline, or an error no retry can fix.")


FINISHED = (Phase.SUCCEEDED, Phase.FAILED)
ACTIVE = (Phase.PENDING, Phase.PROVISIONING, Phase.RUNNING, Phase.RETRYING)


class ConditionType(Vocabulary):
    """status.conditions[].type."""
    READY = "Ready", "The inputs (the S3 Secret) and the RayCluster are ready for the run."
    SUBMITTED = "Submitted", "status.rayJobId was submitted to the RayCluster."
    RUNNING = "Running", "A Ray job of this FineTuneJob is running."
    SUSPENDED = "Suspended", "The job is suspended (runPolicy.suspend)."
    SPEC_ACCEPTED = "SpecAccepted", (
        "The spec in effect is the current one; False: a change was refused, or the spec is "
        "invalid.")
    SUCCEEDED = "Succeeded", "Training finished."
    FAILED = "Failed", "The job failed for good."


class Reason(Vocabulary):
    """Reasons of conditions and Events: CamelCase words that programs match on."""
    SECRET_NOT_FOUND = "SecretNotFound", (
        "The Secret spec.s3.secretRef or spec.tracking.mlflow.secretRef names does not exist; "
        "waiting for it.")
    SECRET_KEY_MISSING = "SecretKeyMissing", (
        "The S3 Secret lacks a required key, or the MLflow Secret has neither a user name and "
        "password nor a token; waiting for it.")
    CLUSTER_CREATING = "ClusterCreating", "The operator is creating the RayCluster."
    CLUSTER_PROVISIONING = "ClusterProvisioning", (
        "The RayCluster exists; KubeRay has not reported it ready yet.")
    CLUSTER_READY = "ClusterReady", "The RayCluster is ready."
    UNSCHEDULABLE = "Unschedulable", (
        "A pod of the RayCluster cannot be scheduled (the message is the scheduler's); "
        "waiting for a node that fits, nothing is retried.")
    CLUSTER_REFUSED = "ClusterRefused", (
        "KubeRay refused the RayCluster or cannot create its pods (the message is KubeRay's); "
        "waiting for a fix, nothing is retried.")
    HEAD_NOT_READY = "HeadNotReady", (
        "The RayCluster's head pod is not ready (restarting, or being replaced by KubeRay).")
    CLUSTER_LOST = "ClusterLost", (
        "The RayCluster of a running attempt is gone: the attempt counts as failed.")
    RAY_JOB_LOST = "RayJobLost", (
        "The RayCluster no longer knows the submitted Ray job (its head restarted): the "
        "attempt counts as failed.")
    CLUSTER_NAME_CONFLICT = "ClusterNameConflict", (
        "A RayCluster of the job's name exists and is not the job's.")
    DASHBOARD_UNREACHABLE = "DashboardUnreachable", (
        "The RayCluster's Ray dashboard does not answer (or refused the token).")
    JOB_SUBMITTED = "JobSubmitted", "The trainer was submitted as a Ray job."
    JOB_RUNNING = "JobRunning", "The Ray job runs."
    ATTEMPT_FAILED = "AttemptFailed", "An attempt failed; the next one is submitted."
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded", (
        "An attempt failed with runPolicy.backoffLimit retries used.")
    DEADLINE_EXCEEDED = "DeadlineExceeded", (
        "The job ran longer than runPolicy.activeDeadlineSeconds.")
    SUCCEEDED = "Succeeded", "Training finished."
    SUSPENDED = "Suspended", "The job was suspended."
    RESUMED = "Resumed", "The job was resumed: a new attempt from the latest checkpoint."
    SPEC_ACCEPTED = "SpecAccepted", "The spec in effect is the current one again."
    IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged", (
        "A field other than runPolicy changed during a run; ignored.")
    INVALID_SPEC = "InvalidSpec", (
        "The API server admitted a spec the operator refuses (e.g. under an older CRD).")
    TTL_EXPIRED = "TTLExpired", "runPolicy.ttlSecondsAfterFinished passed: the job is deleted."
    METRICS_TRACKING = "MetricsTracking", (
        "Where the run's metrics go: TensorBoard files, and the MLflow run created or continued.")
    # The reasons of the trainer's `failed` event; the last two also end the job (see Exit).
    TRAINING_FAILED = "TrainingFailed", "The trainer failed while training (retried)."
    INVALID_JOB = "InvalidJob", "The trainer refused the job document; not retried."
    BAD_INPUT = "BadInput", (
        "Missing bucket, model or dataset, unreadable data, or no GPUs; not retried.")
    STOPPED = "Stopped", (
        "The trainer was stopped by SIGINT or SIGTERM (Ctrl-C, pod deletion, preemption) and "
        "shut Ray Train down; retried from the latest checkpoint.")


@dataclass(frozen=True)
class TrainerExit:
    """An exit code of `finetune-train` / `finetune run`."""
    code: int
    reason: str          # of the trainer's `failed` event ("" for success)
    retryable: bool      # whether the operator retries an attempt that ended with it
    meaning: str


class Exit:
    OK = TrainerExit(0, "", True, "Done.")
    TRAINING_FAILED = TrainerExit(1, Reason.TRAINING_FAILED, True, "Training failed.")
    INVALID_JOB = TrainerExit(2, Reason.INVALID_JOB, False, "Invalid job.")
    BAD_INPUT = TrainerExit(3, Reason.BAD_INPUT, False, "Bad input: missing bucket, model or "
                            "dataset; GPUs asked for but none present.")
    # 128 + the signal, as shells report a process a signal ended. Retryable: an attempt
    # stopped by preemption or a pod's deletion resumes from its latest checkpoint.
    INTERRUPTED = TrainerExit(130, Reason.STOPPED, True, "Stopped by SIGINT (Ctrl-C).")
    TERMINATED = TrainerExit(143, Reason.STOPPED, True, "Stopped by SIGTERM (kill, pod "
                             "deletion, preemption).")


EXITS: dict[int, TrainerExit] = {e.code: e for e in vars(Exit).values()
                                 if isinstance(e, TrainerExit)}


def not_retryable(exit_code: int | None) -> TrainerExit | None:
    """The trainer's exit for a job that can never work (retrying cannot help), else None."""
    known = EXITS.get(exit_code) if exit_code is not None else None
    return known if known is not None and not known.retryable else None


# The environment variable that carries the job document (JSON) to the trainer's driver.
JOB_ENV = "FINETUNE_JOB"
# `finetune run` gives its trainer its pid here: the trainer stops when that process dies.
PARENT_PID_ENV = "FINETUNE_PARENT_PID"
# The operator's Ray submission id of the attempt (submission_id below). The trainer's lease
# records it, so a later attempt of the job can tell an earlier one's lease from another run's.
ATTEMPT_ENV = "FINETUNE_ATTEMPT"

_ATTEMPT = re.compile(r"^(?P<lineage>.+)-a(?P<n>[0-9]+)$")


def submission_id(name: str, uid: str | None, attempt: int) -> str:
    """The Ray submission id of a job's attempt: deterministic per job and attempt (a Ray head
    refuses a second submit of one id), the job's uid in it so a recreated job of the same
    name is another lineage."""
    return f"{name}-{(uid or 'nouid').replace('-', '')[:8]}-a{attempt}"


def split_submission_id(sub_id: str | None) -> tuple[str, int] | None:
    """(the job's lineage, the attempt number) of a submission_id, or None."""
    match = _ATTEMPT.match(sub_id or "")
    return (match.group("lineage"), int(match.group("n"))) if match else None


class S3Secret:
    """Keys of the Secret named by spec.s3.secretRef; the trainer's pods get them as
    environment variables of the same names (the AWS SDKs' own)."""
    ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
    SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
    SESSION_TOKEN = "AWS_SESSION_TOKEN"
    REQUIRED = (ACCESS_KEY_ID, SECRET_ACCESS_KEY)
    OPTIONAL = (SESSION_TOKEN,)


class MlflowSecret:
    """Keys of the Secret named by spec.tracking.mlflow.secretRef; the trainer's pods get them
    as environment variables of the same names (MLflow's own). Each is optional: a server
    takes a user name and password, or a token."""
    USERNAME = "MLFLOW_TRACKING_USERNAME"
    PASSWORD = "MLFLOW_TRACKING_PASSWORD"
    TOKEN = "MLFLOW_TRACKING_TOKEN"
    OPTIONAL = (USERNAME, PASSWORD, TOKEN)
