"""The FineTuneJob state machine: a pure function from (job, observed world) to a decision.

`decide` reads what the reconciler observed (the job's status, its S3 Secret, its
RayCluster, its Ray job) and returns the actions to take, the next phase, the conditions
and the Events to post. It does no I/O, so every transition is a row in a unit test.

    Pending ──► Provisioning ──► Running ──► Succeeded
                     ▲              │   └──► Failed (backoffLimit, DeadlineExceeded)
                     │              ▼
                     └──────── Retrying          any active phase ◄──► Suspended

The Ray job's submission id is written to status.rayJobId before the job is submitted (or
in the same status write as the submission), and it is deterministic, so a restarted
operator looks the id up instead of submitting a second time. A new attempt (retry, lost
cluster, resume after suspension) gets the next id (`-a<N+1>`); the `Submitted` condition
says whether the current id was submitted.

Reading the trainer's progress from the Ray job's log is part of observing (the reconciler
does it before calling `decide`), so it is not an action here. A pass decides once: a
submission carries its outcomes (`Decision.after_submit`), which Ray's answer right after
it picks; the deletion clean-up and a spec the validator refuses are decisions of this
machine too. The words (phases, condition types, reasons) are the contract's
(`finetune_api.status`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from finetune_api.model import FineTuneJob
from finetune_api.status import ACTIVE, FINISHED, MlflowSecret, Phase, Reason, S3Secret, not_retryable
from finetune_api import status as status_ids
from finetune_api.status import ConditionType as Cond

__all__ = ["ACTIVE", "FINISHED", "Phase", "Reason", "Cond", "decide"]  # the vocabulary, re-used


class ClusterState(enum.Enum):
    ABSENT = "absent"
    PROVISIONING = "provisioning"   # exists, KubeRay has not reported `ready` yet
    READY = "ready"
    HEAD_DOWN = "head-down"         # was up; KubeRay reports its head pod not ready
    FOREIGN = "foreign"             # a RayCluster of that name that is not this job's


class SecretState(enum.Enum):
    NOT_NEEDED = "not-needed"       # spec.s3.secretRef is empty: the pods' own identity
    PRESENT = "present"
    MISSING = "missing"
    INCOMPLETE = "incomplete"       # exists but lacks a required key


class RayJobState(enum.Enum):
    UNKNOWN = "unknown"             # not looked up (no ready cluster)
    UNREACHABLE = "unreachable"     # the dashboard did not answer
    NOT_FOUND = "not-found"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def active(self) -> bool:
        return self in (RayJobState.PENDING, RayJobState.RUNNING)


@dataclass(frozen=True)
class Observed:
    """Everything the reconciler saw in one pass."""
    job: FineTuneJob | None     # None only with invalid_spec
    generation: int
    status: dict[str, Any]
    now: datetime
    secret: SecretState = SecretState.NOT_NEEDED
    # spec.tracking.mlflow.secretRef's Secret: the pods read it with optional keys, so
    # without this wait a missing one starts a run that fails at the MLflow server.
    tracking_secret: SecretState = SecretState.NOT_NEEDED
    cluster: ClusterState = ClusterState.ABSENT
    ray_job: RayJobState = RayJobState.UNKNOWN
    ray_job_message: str = ""
    # Immutable fields that changed while the run was active (rejected, see reconcile.py).
    rejected_fields: tuple[str, ...] = ()
    # The driver's exit code as Ray reports it (None while running or if unknown).
    exit_code: int | None = None
    # The trainer's `failed` event message, if its log had one.
    failure_message: str = ""
    # The spec in effect as status.acceptedSpec would store it, while it is not stored yet
    # (observe.accepted_spec); None once it is.
    spec_to_store: str | None = None
    # Why the validator refused the spec the API server admitted (then job is None).
    invalid_spec: str = ""
    # metadata.deletionTimestamp is set: the job is going away.
    deleting: bool = False
    # Why a RayCluster that is not ready cannot come up, as (reason, the other system's
    # words): its pods unschedulable (the scheduler's), or refused by KubeRay (KubeRay's).
    blocked: tuple[str, str] | None = None
    # KubeRay's words on a head that went down (ClusterState.HEAD_DOWN).
    head_trouble: str = ""


# Actions: small records the reconciler executes in order.
@dataclass(frozen=True)
class CreateCluster:
    pass


@dataclass(frozen=True)
class DeleteCluster:
    pass


@dataclass(frozen=True)
class Submit:
    submission_id: str


@dataclass(frozen=True)
class StopJob:
    submission_id: str


@dataclass(frozen=True)
class SaveLog:
    """Keep a failed attempt's log: the tail in status, the whole next to the checkpoints."""
    submission_id: str


@dataclass(frozen=True)
class DeleteJob:
    """ttlSecondsAfterFinished ran out: delete the FineTuneJob itself."""
    pass


Action = CreateCluster | DeleteCluster | Submit | StopJob | SaveLog | DeleteJob


@dataclass(frozen=True)
class Event:
    type: str       # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Condition:
    type: str
    status: str     # "True", "False", "Unknown"
    reason: str
    message: str


@dataclass
class Decision:
    phase: str
    message: str
    actions: list[Action] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)   # other status fields to merge
    # Seconds until the next look; None takes the reconcile interval.
    requeue_after: float | None = None
    # Waiting on something outside the operator (a Secret, the network): the reconciler
    # backs off exponentially while the same reason persists.
    backoff: bool = False
    # Decided with a Submit: what the pass becomes when Ray, asked right after the submission,
    # already reports the job in one of these states. The status then goes straight there in
    # the pass's one write, instead of a "submitted" write and the next state 0.5 s later.
    after_submit: dict[RayJobState, Decision] = field(default_factory=dict)
    # False: nothing is written (the job is being deleted).
    write_status: bool = True

    @property
    def reason(self) -> str | None:
        """The reason of the first condition: what a table test checks."""
        return self.conditions[0].reason if self.conditions else None


def submission_id(job: FineTuneJob, attempt: int) -> str:
    return status_ids.submission_id(job.name, job.uid, attempt)


def attempt_of(sub_id: str | None) -> int:
    split = status_ids.split_submission_id(sub_id)
    return split[1] if split else 0


def next_submission_id(job: FineTuneJob, current: str | None) -> str:
    return submission_id(job, attempt_of(current) + 1)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _provisioning(phase: str) -> str:
    """The phase while a cluster or a Ray job comes up: a retry stays Retrying."""
    return Phase.RETRYING if phase == Phase.RETRYING else Phase.PROVISIONING


# While a stopped Ray job winds down, the next look comes this soon.
STOPPING_POLL_S = 2.0


def _take_down(obs: Observed, sub_id: str | None) -> list[Action]:
    """The actions that take the job's RayCluster down: a Ray job still running is stopped
    first, and the cluster deleted on a later pass, once Ray reports the job over (Ray
    SIGKILLs a driver still there after RAY_JOB_STOP_WAIT_TIME_S, so the wait is bounded).
    Deleting the pods under a running driver kills it with its head: it can neither say
    where it stopped nor release its lease, and the job's next run waits out the stale
    lease, or is refused for it. Ray's answer is only looked for on a ready cluster; any
    other (gone, down, unreachable) has no job left to stop."""
    if sub_id and obs.ray_job.active:
        return [StopJob(sub_id)]
    if obs.cluster in (ClusterState.ABSENT, ClusterState.FOREIGN):
        return []
    return [DeleteCluster()]


def waits_for_stop(decision: Decision) -> bool:
    """Whether the decision stops a Ray job and leaves its cluster for a later pass."""
    return any(isinstance(a, StopJob) for a in decision.actions) \
        and not any(isinstance(a, DeleteCluster) for a in decision.actions)


def _stopping(decision: Decision) -> Decision:
    """Look again soon while a stopped Ray job winds down before its cluster goes."""
    if waits_for_stop(decision):
        decision.requeue_after = STOPPING_POLL_S
    return decision


def _cleanup_actions(obs: Observed, phase: str) -> list[Action]:
    policy = obs.job.spec.run_policy.cleanup_policy
    if policy == "Keep" or (policy == "KeepOnFailure" and phase == Phase.FAILED):
        return []
    return _take_down(obs, obs.status.get("rayJobId"))


def _finished(obs: Observed, phase: str) -> Decision:
    """Succeeded/Failed are final: clean up per policy, expire by TTL, never recreate."""
    job, status = obs.job, obs.status
    decision = Decision(phase=phase, message=status.get("message") or phase)
    decision.actions += _cleanup_actions(obs, phase)
    if waits_for_stop(decision):
        return _stopping(decision)  # a TTL deletion waits for the cluster to go first
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    done = parse_time(status.get("completionTime"))
    if ttl is not None and done is not None:
        expires = done + timedelta(seconds=ttl)
        if obs.now >= expires:
            decision.actions.append(DeleteJob())
            decision.events.append(Event("Normal", Reason.TTL_EXPIRED,
                                         f"Deleting the job {ttl}s after it finished"))
        else:
            decision.requeue_after = (expires - obs.now).total_seconds()
    elif not decision.actions:
        # Nothing will change any more: look rarely.
        decision.requeue_after = 3600.0
    return decision


def _finish(obs: Observed, phase: str, reason: str, message: str,
            extra_actions: list[Action] = ()) -> Decision:
    """The transition into Succeeded or Failed."""
    ok = phase == Phase.SUCCEEDED
    decision = Decision(phase=phase, message=message)
    decision.actions += list(extra_actions)
    decision.actions += [a for a in _cleanup_actions(obs, phase) if a not in decision.actions]
    decision.conditions += [
        Condition(Cond.SUCCEEDED if ok else Cond.FAILED, "True", reason, message),
        Condition(Cond.RUNNING, "False", reason, message),
    ]
    decision.events.append(Event("Normal" if ok else "Warning", reason, message))
    decision.status["completionTime"] = iso(obs.now)
    return _stopping(decision)


def _waiting_for_secret(job: FineTuneJob, obs: Observed) -> tuple[str, str] | None:
    """(reason, message) while a Secret the pods read is missing or lacks its keys."""
    for state, where, name, keys in (
            (obs.secret, "spec.s3.secretRef", job.spec.s3.secret_ref, " or ".join(S3Secret.REQUIRED)),
            (obs.tracking_secret, "spec.tracking.mlflow.secretRef",
             job.spec.tracking.mlflow.secret_ref if job.spec.tracking.mlflow else "",
             f"{MlflowSecret.USERNAME} and {MlflowSecret.PASSWORD}, or {MlflowSecret.TOKEN}")):
        if state == SecretState.MISSING:
            return Reason.SECRET_NOT_FOUND, (f"Secret {name!r} ({where}) not found in namespace "
                                             f"{job.namespace!r}; waiting for it")
        if state == SecretState.INCOMPLETE:
            return Reason.SECRET_KEY_MISSING, f"Secret {name!r} ({where}) lacks {keys}; waiting for them"
    return None


def decide(obs: Observed) -> Decision:
    """The one decision of a pass (the reconciler executes it and writes its status)."""
    if obs.deleting:
        return _deleting(obs)
    if obs.invalid_spec:
        return _invalid(obs)
    status = obs.status
    phase = status.get("phase") or Phase.PENDING
    if phase in FINISHED:
        decision = _finished(obs, phase)
    else:
        decision = _decide_active(obs, phase, status.get("rayJobId"))
        for outcome in (decision, *decision.after_submit.values()):
            _report_spec_changes(obs, phase, outcome)
    if obs.spec_to_store is not None:
        decision.status["acceptedSpec"] = obs.spec_to_store
    return decision


def _report_spec_changes(obs: Observed, phase: str, decision: Decision) -> None:
    """A rejected spec change never stops the run; it is reported beside whatever happens."""
    status = obs.status
    if obs.rejected_fields:
        fields = ", ".join(obs.rejected_fields)
        msg = (f"Changes to {fields} are ignored while the job is {phase}; "
               "suspend the job to change them")
        decision.conditions.append(Condition(Cond.SPEC_ACCEPTED, "False",
                                             Reason.IMMUTABLE_FIELD_CHANGED, msg))
        if not _has_condition(status, Cond.SPEC_ACCEPTED, "False",
                              Reason.IMMUTABLE_FIELD_CHANGED, msg):
            decision.events.append(Event("Warning", Reason.IMMUTABLE_FIELD_CHANGED, msg))
    elif _has_condition(status, Cond.SPEC_ACCEPTED, "False"):
        decision.conditions.append(Condition(Cond.SPEC_ACCEPTED, "True", Reason.SPEC_ACCEPTED,
                                             "The spec in effect is the current one"))


def _deleting(obs: Observed) -> Decision:
    """The job is being deleted (kopf's finalizer holds it meanwhile): stop its Ray job and
    delete its RayCluster; checkpoints and the model stay. Nothing is written to it."""
    sub_id = obs.status.get("rayJobId") or submission_id(obs.job, 1) if obs.job else None
    return _stopping(Decision(phase=obs.status.get("phase") or Phase.PENDING,
                              message=obs.status.get("message") or "",
                              actions=_take_down(obs, sub_id), write_status=False))


def _invalid(obs: Observed) -> Decision:
    """A spec the API server admitted but the validator refuses (e.g. under an old CRD)."""
    msg = f"Invalid spec: {obs.invalid_spec}"
    d = Decision(phase=Phase.FAILED, message=msg)
    d.conditions.append(Condition(Cond.SPEC_ACCEPTED, "False", Reason.INVALID_SPEC, msg))
    if obs.status.get("phase") != Phase.FAILED:
        d.events.append(Event("Warning", Reason.INVALID_SPEC, msg))
        d.status["completionTime"] = iso(obs.now)
    d.requeue_after = 3600.0
    return d


def _has_condition(status: dict[str, Any], ctype: str, cstatus: str,
                   reason: str | None = None, message: str | None = None) -> bool:
    for c in status.get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == cstatus:
            return ((reason is None or c.get("reason") == reason)
                    and (message is None or c.get("message") == message))
    return False


def _decide_active(obs: Observed, phase: str, sub_id: str | None) -> Decision:
    job, status = obs.job, obs.status
    policy = job.spec.run_policy
    retries = int(status.get("retries") or 0)

    # Suspension wins over everything but a finished job.
    if policy.suspend:
        msg = "Suspended: the Ray job is stopped and the RayCluster deleted"
        d = _stopping(Decision(phase=Phase.SUSPENDED, message=msg, actions=_take_down(obs, sub_id)))
        d.conditions += [Condition(Cond.SUSPENDED, "True", Reason.SUSPENDED, msg),
                         Condition(Cond.READY, "False", Reason.SUSPENDED, msg),
                         Condition(Cond.RUNNING, "False", Reason.SUSPENDED, msg),
                         Condition(Cond.SUBMITTED, "False", Reason.SUSPENDED, msg)]
        if phase != Phase.SUSPENDED:
            d.events.append(Event("Normal", Reason.SUSPENDED, msg))
        return d

    if phase == Phase.SUSPENDED:
        # Resume: a fresh attempt id (the old Ray job was stopped); the trainer resumes from
        # the latest checkpoint by itself.
        msg = "Resumed: recreating the RayCluster"
        d = Decision(phase=Phase.PROVISIONING, message=msg)
        if sub_id:
            d.status["rayJobId"] = next_submission_id(job, sub_id)
        d.conditions += [Condition(Cond.SUSPENDED, "False", Reason.RESUMED, msg)]
        d.events.append(Event("Normal", Reason.RESUMED, msg))
        d.requeue_after = 0.0
        return d

    # activeDeadlineSeconds counts from the first start (suspended time included).
    started = parse_time(status.get("startTime"))
    if policy.active_deadline_seconds is not None and started is not None:
        if obs.now - started >= timedelta(seconds=policy.active_deadline_seconds):
            stop = [StopJob(sub_id)] if sub_id and obs.ray_job.active else []
            return _finish(obs, Phase.FAILED, Reason.DEADLINE_EXCEEDED,
                           f"The job ran longer than activeDeadlineSeconds="
                           f"{policy.active_deadline_seconds}", stop)

    # Inputs: the Secrets the pods read must exist before any pod is created.
    waiting = _waiting_for_secret(job, obs) if obs.cluster == ClusterState.ABSENT else None
    if waiting is not None:
        reason, msg = waiting
        d = Decision(phase=phase, message=msg)
        d.conditions.append(Condition(Cond.READY, "False", reason, msg))
        if not _has_condition(status, Cond.READY, "False", reason):
            d.events.append(Event("Warning", reason, msg))
        d.backoff = True
        return d

    match obs.cluster:
        case ClusterState.FOREIGN:
            msg = (f"A RayCluster named {job.name!r} exists and does not belong to this "
                   "job; delete or rename it")
            d = Decision(phase=phase, message=msg)
            d.conditions.append(Condition(Cond.READY, "False", Reason.CLUSTER_NAME_CONFLICT,
                                          msg))
            if not _has_condition(status, Cond.READY, "False", Reason.CLUSTER_NAME_CONFLICT):
                d.events.append(Event("Warning", Reason.CLUSTER_NAME_CONFLICT, msg))
            d.backoff = True
            return d
        case ClusterState.ABSENT:
            return _cluster_gone(obs, phase, sub_id, retries)
        case ClusterState.PROVISIONING:
            if obs.blocked is not None:
                return _cluster_blocked(obs, phase, *obs.blocked)
            msg = "Waiting for the RayCluster to become ready"
            d = Decision(phase=_provisioning(phase), message=msg)
            d.conditions.append(Condition(Cond.READY, "False", Reason.CLUSTER_PROVISIONING,
                                          msg))
            return d
        case ClusterState.HEAD_DOWN:
            # Not yet a failed attempt: a head that comes back with the job still known (a
            # readiness probe that timed out) lost nothing. A head whose Ray forgot the job
            # is found out when it is ready again (_cluster_ready, RayJobLost).
            msg = "The RayCluster's head pod is not ready; waiting for KubeRay to restore it"
            detail = msg + (f" ({obs.head_trouble})" if obs.head_trouble else "")
            d = Decision(phase=phase if phase != Phase.PENDING else Phase.PROVISIONING,
                         message=msg)
            d.conditions.append(Condition(Cond.READY, "False", Reason.HEAD_NOT_READY, detail))
            if not _has_condition(status, Cond.READY, "False", Reason.HEAD_NOT_READY):
                d.events.append(Event("Warning", Reason.HEAD_NOT_READY, detail))
            return d
    return _cluster_ready(obs, phase, sub_id, retries)


def _cluster_blocked(obs: Observed, phase: str, reason: str, words: str) -> Decision:
    """The RayCluster cannot come up (unschedulable pods, refused by KubeRay): say why in the
    other system's words and wait. Nothing is deleted or retried (a node that fits, or a fix,
    lets it proceed by itself); no attempt ran, so none is counted."""
    if reason == Reason.UNSCHEDULABLE:
        msg = f"The RayCluster's pods cannot be scheduled; waiting for a node that fits: {words}"
    else:
        msg = f"KubeRay cannot bring the RayCluster up: {words}"
    d = Decision(phase=_provisioning(phase), message=msg)
    d.conditions.append(Condition(Cond.READY, "False", reason, msg))
    # One Event per reason: the scheduler's counts in the message change from pass to pass.
    if not _has_condition(obs.status, Cond.READY, "False", reason):
        d.events.append(Event("Warning", reason, msg))
    # Looked at every reconcile interval, not backed off: a node that joins (or a fix) is
    # seen soon, and a look is two reads, nothing written unless the words change.
    return d


def _cluster_gone(obs: Observed, phase: str, sub_id: str | None, retries: int) -> Decision:
    """No RayCluster: create one. An attempt that was submitted to the one that went is lost."""
    job = obs.job
    actions: list[Action] = [CreateCluster()]
    # An attempt that was running on the lost cluster is lost with it and counts as a
    # failed attempt, so a cluster that keeps breaking ends in Failed, not in a loop.
    lost_attempt = phase in (Phase.RUNNING, Phase.PROVISIONING, Phase.RETRYING) \
        and sub_id is not None and status_submitted(obs.status)
    if lost_attempt:
        reason = Reason.CLUSTER_LOST
        if retries >= job.spec.run_policy.backoff_limit:
            msg = (f"The RayCluster was lost and the backoff limit "
                   f"({job.spec.run_policy.backoff_limit}) is reached")
            return _finish(obs, Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, msg)
        msg = (f"The RayCluster was lost during attempt {attempt_of(sub_id)}; recreating it "
               "and retrying")
        d = Decision(phase=Phase.RETRYING, message=msg, actions=actions)
        d.status.update(retries=retries + 1, rayJobId=next_submission_id(job, sub_id))
        d.conditions += [Condition(Cond.READY, "False", reason, msg),
                         Condition(Cond.RUNNING, "False", reason, msg),
                         Condition(Cond.SUBMITTED, "False", reason, msg)]
        d.events.append(Event("Warning", reason, msg))
        return d
    msg = "Creating the RayCluster"
    d = Decision(phase=_provisioning(phase), message=msg,
                 actions=actions)
    d.conditions.append(Condition(Cond.READY, "False", Reason.CLUSTER_CREATING, msg))
    if phase == Phase.PENDING:
        d.events.append(Event("Normal", Reason.CLUSTER_CREATING,
                              f"Creating RayCluster {job.name!r}"))
    return d


def _ray_job_active(obs: Observed, phase: str, sub_id: str, state: RayJobState) -> Decision:
    """The Ray job of the current attempt is PENDING or RUNNING."""
    status = obs.status
    ready = Condition(Cond.READY, "True", Reason.CLUSTER_READY, "The RayCluster is ready")
    submitted = Condition(Cond.SUBMITTED, "True", Reason.JOB_SUBMITTED,
                          f"Submitted Ray job {sub_id}")
    if state == RayJobState.PENDING:
        msg = f"Ray job {sub_id} is starting"
        d = Decision(phase=_provisioning(phase),
                     message=msg)
        d.status["rayJobId"] = sub_id
        d.conditions += [ready, submitted]
        return d
    msg = f"Training (Ray job {sub_id}, attempt {attempt_of(sub_id)})"
    d = Decision(phase=Phase.RUNNING, message=msg)
    d.status["rayJobId"] = sub_id
    d.conditions += [ready, submitted, Condition(Cond.RUNNING, "True", Reason.JOB_RUNNING, msg)]
    if phase != Phase.RUNNING:
        d.status["runningSince"] = iso(obs.now)
        if not status.get("startTime"):
            d.status["startTime"] = iso(obs.now)
        d.events.append(Event("Normal", Reason.JOB_RUNNING, msg))
    return d


def status_submitted(status: dict[str, Any]) -> bool:
    """Whether status.rayJobId was submitted (kept in the Submitted condition)."""
    return _has_condition(status, Cond.SUBMITTED, "True")


def _cluster_ready(obs: Observed, phase: str, sub_id: str | None, retries: int) -> Decision:
    job, status = obs.job, obs.status
    sub_id = sub_id or submission_id(job, 1)
    ready = Condition(Cond.READY, "True", Reason.CLUSTER_READY, "The RayCluster is ready")

    match obs.ray_job:
        case RayJobState.UNKNOWN | RayJobState.UNREACHABLE:
            msg = "The Ray dashboard of the RayCluster does not answer; retrying"
            d = Decision(phase=phase if phase != Phase.PENDING else Phase.PROVISIONING, message=msg)
            d.conditions.append(Condition(Cond.READY, "False", Reason.DASHBOARD_UNREACHABLE,
                                          msg + (f": {obs.ray_job_message}"
                                                 if obs.ray_job_message else "")))
            if not _has_condition(status, Cond.READY, "False", Reason.DASHBOARD_UNREACHABLE):
                d.events.append(Event("Warning", Reason.DASHBOARD_UNREACHABLE, msg))
            d.backoff = True
            return d
        case RayJobState.NOT_FOUND if status_submitted(status) \
                and status.get("rayJobId") == sub_id:
            # Submitted, and the cluster's Ray has no record of it: its head restarted
            # (KubeRay restarts the container or replaces the pod; Ray without GCS fault
            # tolerance forgets every job). A failed attempt, counted like any other; never
            # the same id again (its log and outcome are gone with the old head).
            return _attempt_failed(obs, sub_id, retries, Reason.RAY_JOB_LOST,
                                   "the RayCluster's head restarted and no longer knows "
                                   f"Ray job {sub_id}")
        case RayJobState.NOT_FOUND:
            if obs.spec_to_store is not None:
                # The spec a run starts from is stored before the run is submitted (a pass
                # that submits on an already ready cluster: a restarted operator's, a resumed
                # job's): this pass stores it, the next one, at once, submits.
                msg = f"The RayCluster is ready; submitting Ray job {sub_id}"
                d = Decision(phase=_provisioning(phase), message=msg)
                d.conditions.append(ready)
                d.requeue_after = 0.0
                return d
            msg = f"Submitted Ray job {sub_id}"
            d = Decision(phase=_provisioning(phase),
                         message=msg, actions=[Submit(sub_id)])
            d.status["rayJobId"] = sub_id
            d.conditions += [ready, Condition(Cond.SUBMITTED, "True", Reason.JOB_SUBMITTED, msg)]
            submitted = Event("Normal", Reason.JOB_SUBMITTED, msg)
            d.events.append(submitted)
            d.requeue_after = 0.5
            for state in (RayJobState.PENDING, RayJobState.RUNNING):
                outcome = _ray_job_active(obs, d.phase, sub_id, state)
                # Already running: the JobRunning Event names the Ray job, so a JobSubmitted
                # Event of the same instant would only repeat it.
                if not outcome.events:
                    outcome.events.append(submitted)
                d.after_submit[state] = outcome
            return d
        case RayJobState.PENDING | RayJobState.RUNNING:
            return _ray_job_active(obs, phase, sub_id, obs.ray_job)
        case RayJobState.SUCCEEDED:
            msg = f"Training finished (Ray job {sub_id})"
            d = _finish(obs, Phase.SUCCEEDED, Reason.SUCCEEDED, msg, [])
            if not status.get("startTime"):
                d.status["startTime"] = iso(obs.now)
            return d
    # FAILED or STOPPED (stopped by someone else: the operator stops jobs only when it
    # leaves the active phases, so a STOPPED job here was not its doing).
    detail = obs.failure_message or obs.ray_job_message or obs.ray_job.value
    refused = not_retryable(obs.exit_code)
    if refused is not None:
        reason = refused.reason
        msg = f"The trainer refused the job ({reason}), retrying cannot help: {detail}"
        return _finish(obs, Phase.FAILED, reason, msg, [SaveLog(sub_id)])
    return _attempt_failed(obs, sub_id, retries, Reason.ATTEMPT_FAILED, detail)


def _attempt_failed(obs: Observed, sub_id: str, retries: int, reason: str,
                    detail: str) -> Decision:
    """A failed attempt: the next one (a new submission id, resuming from the latest
    checkpoint) while runPolicy.backoffLimit allows, Failed after that; its log is kept."""
    job = obs.job
    limit = job.spec.run_policy.backoff_limit
    if retries >= limit:
        msg = (f"Attempt {attempt_of(sub_id)} failed and the backoff limit ({limit}) is "
               f"reached: {detail}")
        return _finish(obs, Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, msg,
                       [SaveLog(sub_id)])
    next_id = next_submission_id(job, sub_id)
    msg = (f"Attempt {attempt_of(sub_id)} failed ({detail}); retrying as {next_id} "
           f"({retries + 1}/{limit})")
    d = Decision(phase=Phase.RETRYING, message=msg,
                 actions=[SaveLog(sub_id)])
    d.status.update(retries=retries + 1, rayJobId=next_id)
    d.conditions += [Condition(Cond.RUNNING, "False", reason, msg),
                     Condition(Cond.SUBMITTED, "False", reason, msg)]
    d.events.append(Event("Warning", reason, msg))
    d.requeue_after = 0.0
    return d
