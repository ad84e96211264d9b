"""The state machine as a table: (phase, observed world) -> (actions, next phase, reason)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from finetune_operator import phases
from finetune_operator.phases import (ClusterState as C, CreateCluster, DeleteCluster, DeleteJob,
                                      Observed, RayJobState as R, Reason, SaveLog,
                                      SecretState as S, StopJob, Submit, decide)

from operator_jobs import job

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=timezone.utc)
JOB = job()
A1 = phases.submission_id(JOB, 1)
A2 = phases.submission_id(JOB, 2)
SUBMITTED = {"type": "Submitted", "status": "True", "reason": "JobSubmitted"}


def obs(status=None, *, j=JOB, secret=S.PRESENT, cluster=C.ABSENT, ray=R.UNKNOWN,
        exit_code=None, rejected=(), now=NOW, deleting=False, invalid="", to_store=None,
        blocked=None, head_trouble=""):
    return Observed(job=None if invalid else j, generation=1, status=status or {}, now=now,
                    secret=secret, cluster=cluster, ray_job=ray, exit_code=exit_code,
                    rejected_fields=rejected, deleting=deleting, invalid_spec=invalid,
                    spec_to_store=to_store, blocked=blocked, head_trouble=head_trouble)


UNSCHEDULABLE = (Reason.UNSCHEDULABLE, "pod llama-workers-worker-x: 0/3 nodes are available: "
                 "3 node(s) didn't match Pod's node affinity/selector.")
REFUSED = (Reason.CLUSTER_REFUSED, "InvalidRayClusterSpec: The RayCluster spec is invalid")


def running(**extra):
    return {"phase": "Running", "rayJobId": A1, "conditions": [SUBMITTED],
            "startTime": "2026-11-24T11:00:00Z", **extra}


TABLE = [
    # id, status, observed world, expected actions, next phase, first condition's reason
    ("new job, secret missing", {}, dict(secret=S.MISSING),
     [], "Pending", Reason.SECRET_NOT_FOUND),
    ("new job, secret lacks keys", {}, dict(secret=S.INCOMPLETE),
     [], "Pending", Reason.SECRET_KEY_MISSING),
    ("new job, secret present", {}, dict(),
     [CreateCluster()], "Provisioning", Reason.CLUSTER_CREATING),
    ("new job, no secret needed", {}, dict(secret=S.NOT_NEEDED),
     [CreateCluster()], "Provisioning", Reason.CLUSTER_CREATING),
    ("cluster coming up", {"phase": "Provisioning"}, dict(cluster=C.PROVISIONING),
     [], "Provisioning", Reason.CLUSTER_PROVISIONING),
    ("name taken by another object", {"phase": "Provisioning"}, dict(cluster=C.FOREIGN),
     [], "Provisioning", Reason.CLUSTER_NAME_CONFLICT),
    ("cluster ready, nothing submitted", {"phase": "Provisioning"},
     dict(cluster=C.READY, ray=R.NOT_FOUND),
     [Submit(A1)], "Provisioning", Reason.CLUSTER_READY),
    ("dashboard does not answer", {"phase": "Provisioning"},
     dict(cluster=C.READY, ray=R.UNREACHABLE),
     [], "Provisioning", Reason.DASHBOARD_UNREACHABLE),
    ("ray job pending", {"phase": "Provisioning", "rayJobId": A1},
     dict(cluster=C.READY, ray=R.PENDING), [], "Provisioning", Reason.CLUSTER_READY),
    ("ray job running", {"phase": "Provisioning", "rayJobId": A1},
     dict(cluster=C.READY, ray=R.RUNNING), [], "Running", Reason.CLUSTER_READY),
    ("ray job succeeded, DeleteCluster", running(), dict(cluster=C.READY, ray=R.SUCCEEDED),
     [DeleteCluster()], "Succeeded", Reason.SUCCEEDED),
    ("ray job failed, retry", running(), dict(cluster=C.READY, ray=R.FAILED),
     [SaveLog(A1)], "Retrying", Reason.ATTEMPT_FAILED),
    ("ray job stopped by someone, retry", running(), dict(cluster=C.READY, ray=R.STOPPED),
     [SaveLog(A1)], "Retrying", Reason.ATTEMPT_FAILED),
    ("trainer stopped by SIGTERM (preempted), retry", running(),
     dict(cluster=C.READY, ray=R.FAILED, exit_code=143),
     [SaveLog(A1)], "Retrying", Reason.ATTEMPT_FAILED),
    ("retry submits the next attempt", {"phase": "Retrying", "rayJobId": A2, "retries": 1},
     dict(cluster=C.READY, ray=R.NOT_FOUND), [Submit(A2)], "Retrying", Reason.CLUSTER_READY),
    ("failed and out of retries", running(retries=3), dict(cluster=C.READY, ray=R.FAILED),
     [SaveLog(A1), DeleteCluster()], "Failed", Reason.BACKOFF_LIMIT_EXCEEDED),
    ("bad input is not retried", running(), dict(cluster=C.READY, ray=R.FAILED, exit_code=3),
     [SaveLog(A1), DeleteCluster()], "Failed", Reason.BAD_INPUT),
    ("cluster lost mid-run", running(), dict(cluster=C.ABSENT),
     [CreateCluster()], "Retrying", Reason.CLUSTER_LOST),
    ("head pod down mid-run: wait, count nothing yet", running(), dict(cluster=C.HEAD_DOWN),
     [], "Running", Reason.HEAD_NOT_READY),
    ("head back, its Ray forgot the submitted job: a failed attempt", running(),
     dict(cluster=C.READY, ray=R.NOT_FOUND), [SaveLog(A1)], "Retrying", Reason.RAY_JOB_LOST),
    ("head back, job forgotten, out of retries", running(retries=3),
     dict(cluster=C.READY, ray=R.NOT_FOUND), [SaveLog(A1), DeleteCluster()], "Failed",
     Reason.BACKOFF_LIMIT_EXCEEDED),
    ("pods unschedulable: wait, nothing deleted", {"phase": "Provisioning"},
     dict(cluster=C.PROVISIONING, blocked=UNSCHEDULABLE), [], "Provisioning",
     Reason.UNSCHEDULABLE),
    ("a retry's pods unschedulable: still Retrying", {"phase": "Retrying", "retries": 1},
     dict(cluster=C.PROVISIONING, blocked=UNSCHEDULABLE), [], "Retrying",
     Reason.UNSCHEDULABLE),
    ("KubeRay refuses the cluster: wait, nothing deleted", {"phase": "Provisioning"},
     dict(cluster=C.PROVISIONING, blocked=REFUSED), [], "Provisioning",
     Reason.CLUSTER_REFUSED),
    ("cluster lost, out of retries", running(retries=3), dict(cluster=C.ABSENT),
     [], "Failed", Reason.BACKOFF_LIMIT_EXCEEDED),
    ("deadline passed while running",
     running(startTime="2026-11-24T10:00:00Z"),
     dict(j=job(**{"spec.runPolicy.activeDeadlineSeconds": 600}), cluster=C.READY,
          ray=R.RUNNING),
     [StopJob(A1)], "Failed", Reason.DEADLINE_EXCEEDED),
    ("past the deadline, the stopped Ray job over: the cluster goes",
     {**running(), "phase": "Failed"}, dict(cluster=C.READY, ray=R.STOPPED),
     [DeleteCluster()], "Failed", None),
    ("past the deadline, the Ray job still stopping: the cluster waits",
     {**running(), "phase": "Failed"}, dict(cluster=C.READY, ray=R.RUNNING),
     [StopJob(A1)], "Failed", None),
    ("deadline not yet passed", running(startTime="2026-11-24T11:59:00Z"),
     dict(j=job(**{"spec.runPolicy.activeDeadlineSeconds": 600}), cluster=C.READY,
          ray=R.RUNNING),
     [], "Running", Reason.CLUSTER_READY),
    ("suspend a running job", running(),
     dict(j=job(**{"spec.runPolicy.suspend": True}), cluster=C.READY, ray=R.RUNNING),
     [StopJob(A1)], "Suspended", Reason.SUSPENDED),
    ("suspended, the stopped Ray job over: the cluster goes", {**running(), "phase": "Suspended"},
     dict(j=job(**{"spec.runPolicy.suspend": True}), cluster=C.READY, ray=R.STOPPED),
     [DeleteCluster()], "Suspended", Reason.SUSPENDED),
    ("suspended and cleaned up", {"phase": "Suspended", "rayJobId": A1},
     dict(j=job(**{"spec.runPolicy.suspend": True})), [], "Suspended", Reason.SUSPENDED),
    ("resume", {"phase": "Suspended", "rayJobId": A1}, dict(),
     [], "Provisioning", Reason.RESUMED),
    ("suspend before anything ran", {},
     dict(j=job(**{"spec.runPolicy.suspend": True})), [], "Suspended", Reason.SUSPENDED),
    ("succeeded, cluster still there", {"phase": "Succeeded"}, dict(cluster=C.READY),
     [DeleteCluster()], "Succeeded", None),
    ("succeeded, Keep policy", {"phase": "Succeeded"},
     dict(j=job(**{"spec.runPolicy.cleanupPolicy": "Keep"}), cluster=C.READY),
     [], "Succeeded", None),
    ("failed, KeepOnFailure", running(retries=3),
     dict(j=job(**{"spec.runPolicy.cleanupPolicy": "KeepOnFailure"}), cluster=C.READY,
          ray=R.FAILED),
     [SaveLog(A1)], "Failed", Reason.BACKOFF_LIMIT_EXCEEDED),
    ("succeeded, KeepOnFailure deletes", running(),
     dict(j=job(**{"spec.runPolicy.cleanupPolicy": "KeepOnFailure"}), cluster=C.READY,
          ray=R.SUCCEEDED),
     [DeleteCluster()], "Succeeded", Reason.SUCCEEDED),
    ("finished jobs never recreate children", {"phase": "Failed"}, dict(cluster=C.ABSENT),
     [], "Failed", None),
    ("ttl expired", {"phase": "Succeeded", "completionTime": "2026-11-24T11:00:00Z"},
     dict(j=job(**{"spec.runPolicy.ttlSecondsAfterFinished": 60})), [DeleteJob()],
     "Succeeded", None),
    ("ttl not yet expired", {"phase": "Succeeded", "completionTime": "2026-11-24T11:59:30Z"},
     dict(j=job(**{"spec.runPolicy.ttlSecondsAfterFinished": 60})), [], "Succeeded", None),
    ("deleted while running: stop, the cluster waits for the stop", running(),
     dict(cluster=C.READY, ray=R.RUNNING, deleting=True), [StopJob(A1)], "Running", None),
    ("deleted, the stopped Ray job over: the cluster goes", running(),
     dict(cluster=C.READY, ray=R.STOPPED, deleting=True), [DeleteCluster()], "Running", None),
    ("deleted, the dashboard does not answer: the cluster goes", running(),
     dict(cluster=C.READY, ray=R.UNREACHABLE, deleting=True), [DeleteCluster()], "Running",
     None),
    ("deleted before anything was submitted: the first attempt's id is stopped", {},
     dict(cluster=C.READY, ray=R.PENDING, deleting=True), [StopJob(A1)], "Pending", None),
    ("deleted while the cluster comes up", {"phase": "Provisioning"},
     dict(cluster=C.PROVISIONING, deleting=True), [DeleteCluster()], "Provisioning", None),
    ("deleted, no cluster", {"phase": "Succeeded"}, dict(cluster=C.ABSENT, deleting=True),
     [], "Succeeded", None),
    ("deleted, the cluster of that name is not the job's", {"phase": "Provisioning"},
     dict(cluster=C.FOREIGN, deleting=True), [], "Provisioning", None),
    ("deleted with an invalid spec: the cluster goes, nothing to stop", {"phase": "Failed"},
     dict(cluster=C.READY, deleting=True, invalid="spec.x: bad"), [DeleteCluster()], "Failed",
     None),
    ("invalid spec fails the job", {}, dict(invalid="spec.x: bad"), [], "Failed",
     Reason.INVALID_SPEC),
    ("ready cluster, spec not stored yet: store it first, submit next",
     {"phase": "Pending"}, dict(cluster=C.READY, ray=R.NOT_FOUND, to_store="{}"),
     [], "Provisioning", Reason.CLUSTER_READY),
]


@pytest.mark.parametrize("status,world,actions,phase,reason",
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_transition(status, world, actions, phase, reason):
    d = decide(obs(status, **world))
    assert d.actions == actions
    assert d.phase == phase
    assert d.reason == reason


def test_a_running_ray_job_is_stopped_before_its_cluster_goes():
    """Deadline, suspension, deletion: the pass that stops the Ray job leaves the cluster to
    the pass that sees the job over, and comes back soon for it."""
    deadline = job(**{"spec.runPolicy.activeDeadlineSeconds": 600})
    for status, world in (
            (running(startTime="2026-11-24T10:00:00Z"), dict(j=deadline)),
            (running(), dict(j=job(**{"spec.runPolicy.suspend": True}))),
            (running(), dict(deleting=True)),
            ({**running(), "phase": "Failed"}, dict())):
        stopping = decide(obs(status, cluster=C.READY, ray=R.RUNNING, **world))
        assert stopping.actions == [StopJob(A1)], (status, world)
        assert stopping.requeue_after == phases.STOPPING_POLL_S
        over = decide(obs({**status, "phase": stopping.phase}, cluster=C.READY, ray=R.STOPPED,
                          **world))
        assert over.actions == [DeleteCluster()], (status, world)
        assert over.requeue_after != phases.STOPPING_POLL_S


def test_deletion_writes_nothing():
    d = decide(obs(running(), cluster=C.READY, deleting=True))
    assert not d.write_status and not d.events and not d.conditions


def test_invalid_spec_fails_once():
    first = decide(obs({}, invalid="spec.x: bad"))
    assert first.message == "Invalid spec: spec.x: bad" and first.requeue_after == 3600
    assert [e.reason for e in first.events] == [Reason.INVALID_SPEC]
    assert first.status == {"completionTime": "2026-11-24T12:00:00Z"}
    again = decide(obs({"phase": "Failed"}, invalid="spec.x: bad"))
    assert again.events == [] and again.status == {}


def test_the_spec_is_stored_with_the_decision_and_before_any_submit():
    d = decide(obs({}, to_store='{"a": 1}'))
    assert d.actions == [CreateCluster()] and d.status["acceptedSpec"] == '{"a": 1}'
    first = decide(obs({"phase": "Pending"}, cluster=C.READY, ray=R.NOT_FOUND, to_store="{}"))
    assert first.status["acceptedSpec"] == "{}" and first.requeue_after == 0
    assert not any(isinstance(a, Submit) for a in first.actions)


def test_submit_decides_its_outcomes_once():
    """Ray's answer right after the submission picks one of the outcomes decided with it."""
    d = decide(obs({"phase": "Provisioning"}, cluster=C.READY, ray=R.NOT_FOUND))
    assert d.actions == [Submit(A1)] and d.requeue_after == 0.5
    assert [e.reason for e in d.events] == [Reason.JOB_SUBMITTED]
    assert set(d.after_submit) == {R.PENDING, R.RUNNING}
    pending, running_now = d.after_submit[R.PENDING], d.after_submit[R.RUNNING]
    # Each is what the next pass would have decided, with the submission's Event.
    later = decide(obs({"phase": "Provisioning", "rayJobId": A1}, cluster=C.READY,
                       ray=R.PENDING))
    assert (pending.phase, pending.message, pending.conditions, pending.status) == \
        (later.phase, later.message, later.conditions, later.status)
    assert [e.reason for e in pending.events] == [Reason.JOB_SUBMITTED]
    assert running_now.phase == "Running" and not running_now.actions
    assert running_now.status["startTime"] == running_now.status["runningSince"]
    # Already running: JobRunning names the Ray job; a JobSubmitted would only repeat it.
    assert [e.reason for e in running_now.events] == [Reason.JOB_RUNNING]
    assert running_now.requeue_after is None and pending.requeue_after is None


def test_a_job_the_head_forgot_counts_and_the_next_attempt_gets_a_new_id():
    # KubeRay restarted the head (container or pod): its Ray has no record of the submitted
    # job. The same id is never submitted again; the next attempt resumes from the checkpoint.
    d = decide(obs(running(), cluster=C.READY, ray=R.NOT_FOUND))
    assert d.status == {"retries": 1, "rayJobId": A2}
    assert not any(isinstance(a, Submit) for a in d.actions)
    assert [(e.type, e.reason) for e in d.events] == [("Warning", Reason.RAY_JOB_LOST)]
    assert "head restarted" in d.message
    # The next pass submits A2, which counts nothing more and goes Running when Ray runs it.
    nxt = decide(obs({"phase": "Retrying", "rayJobId": A2, "retries": 1,
                      "startTime": "2026-11-24T11:00:00Z", "conditions": [
                          {"type": "Submitted", "status": "False", "reason": "RayJobLost"}]},
                     cluster=C.READY, ray=R.NOT_FOUND))
    assert nxt.actions == [Submit(A2)] and "retries" not in nxt.status
    assert "runningSince" in nxt.after_submit[R.RUNNING].status


def test_a_job_not_yet_submitted_is_submitted_not_counted():
    # Not found, and the status does not say it was submitted (a pass that died before its
    # submission, or a fresh id): that is the normal submission, not a lost job.
    for status in ({"phase": "Provisioning", "rayJobId": A1},
                   {"phase": "Running", "rayJobId": A2, "retries": 1,
                    "conditions": [{**SUBMITTED, "status": "False"}]}):
        d = decide(obs(status, cluster=C.READY, ray=R.NOT_FOUND))
        assert [type(a) for a in d.actions] == [Submit] and "retries" not in d.status


def test_blocked_cluster_says_why_once_and_backs_off():
    d = decide(obs({"phase": "Provisioning"}, cluster=C.PROVISIONING, blocked=UNSCHEDULABLE))
    assert not d.backoff and d.requeue_after is None  # the reconcile interval: a node may join
    assert not d.actions and "retries" not in d.status
    assert UNSCHEDULABLE[1] in d.conditions[0].message
    assert [(e.type, e.reason) for e in d.events] == [("Warning", Reason.UNSCHEDULABLE)]
    ready = {"type": "Ready", "status": "False", "reason": d.conditions[0].reason,
             "message": d.conditions[0].message}
    again = decide(obs({"phase": "Provisioning", "conditions": [ready]},
                       cluster=C.PROVISIONING, blocked=UNSCHEDULABLE))
    assert again.events == []


def test_head_down_names_kuberays_words():
    d = decide(obs(running(), cluster=C.HEAD_DOWN,
                   head_trouble="HeadPodNotReady: containers with unready status: [ray-head]"))
    assert "containers with unready status" in d.conditions[0].message
    assert d.status == {} and d.actions == []


def test_outcomes_carry_a_rejected_spec_change():
    d = decide(obs({"phase": "Provisioning"}, cluster=C.READY, ray=R.NOT_FOUND,
                   rejected=("spec.resources.workers",)))
    for outcome in (d, *d.after_submit.values()):
        assert any(c.reason == Reason.IMMUTABLE_FIELD_CHANGED for c in outcome.conditions)


def test_retry_bumps_attempt_and_counts():
    d = decide(obs(running(), cluster=C.READY, ray=R.FAILED))
    assert d.status == {"retries": 1, "rayJobId": A2}
    assert [e.reason for e in d.events] == [Reason.ATTEMPT_FAILED]
    assert d.events[0].type == "Warning"


def test_submission_ids_are_deterministic_per_job_and_attempt():
    assert A1 == "llama-0f1e2d3c-a1"
    assert phases.attempt_of(A2) == 2
    assert phases.next_submission_id(JOB, A2) == phases.submission_id(JOB, 3)
    other = job(**{"metadata.uid": "11111111-2222-3333-4444-555555555555"})
    assert phases.submission_id(other, 1) != A1


def test_first_running_sets_start_and_running_since():
    d = decide(obs({"phase": "Provisioning", "rayJobId": A1}, cluster=C.READY, ray=R.RUNNING))
    assert d.status["startTime"] == d.status["runningSince"] == "2026-11-24T12:00:00Z"
    assert [e.reason for e in d.events] == [Reason.JOB_RUNNING]
    again = decide(obs(running(), cluster=C.READY, ray=R.RUNNING))
    assert "startTime" not in again.status and not again.events


def test_resume_uses_a_new_attempt_id():
    d = decide(obs({"phase": "Suspended", "rayJobId": A1}))
    assert d.status["rayJobId"] == A2


def test_missing_secret_posts_one_event_and_backs_off():
    first = decide(obs({}, secret=S.MISSING))
    assert "s3-credentials" in first.message and first.backoff
    assert len(first.events) == 1 and first.events[0].reason == Reason.SECRET_NOT_FOUND
    cond = first.conditions[0]
    status = {"phase": "Pending", "conditions": [
        {"type": cond.type, "status": cond.status, "reason": cond.reason}]}
    assert decide(obs(status, secret=S.MISSING)).events == []


def test_missing_secret_does_not_matter_once_the_cluster_exists():
    d = decide(obs(running(), secret=S.MISSING, cluster=C.READY, ray=R.RUNNING))
    assert d.phase == "Running"


def test_rejected_spec_change_keeps_the_run_going():
    d = decide(obs(running(), cluster=C.READY, ray=R.RUNNING,
                   rejected=("spec.resources.workers",)))
    assert d.phase == "Running" and d.actions == []
    (cond,) = [c for c in d.conditions if c.type == "SpecAccepted"]
    assert cond.status == "False" and cond.reason == Reason.IMMUTABLE_FIELD_CHANGED
    assert "spec.resources.workers" in cond.message
    assert [e.reason for e in d.events] == [Reason.IMMUTABLE_FIELD_CHANGED]


def test_finished_job_without_ttl_is_looked_at_rarely():
    d = decide(obs({"phase": "Succeeded"}, cluster=C.ABSENT))
    assert d.requeue_after >= 600


def test_ttl_requeues_at_expiry():
    d = decide(obs({"phase": "Failed", "completionTime": "2026-11-24T11:59:30Z"},
                   j=job(**{"spec.runPolicy.ttlSecondsAfterFinished": 60})))
    assert d.requeue_after == pytest.approx(30)
