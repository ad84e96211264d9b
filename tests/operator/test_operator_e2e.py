"""The operator end to end: kopf in-process, the API emulator, the KubeRay stand-in, a real
Ray head and the real trainer (`finetune-train`) on CPU with a tiny model in moto S3.

Each real training run costs about a minute on 2 cores, so the scenarios share runs where
they can (missing Secret -> run -> delete; fail once -> retry -> succeed).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from finetune_testbed.rbac import assert_calls_granted

from conftest import NAMESPACE, free_port, wait_until

# Fixture order matters: s3_server and tiny_assets come first so that the session's Ray head
# (started by ray_head) inherits the moto credentials in its environment, as pods get them
# from the job's Secret in a cluster.

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

FTJ = ("finetune.dev/v1alpha1", "finetunejobs")
RC = ("ray.io/v1", "rayclusters")


# The chart values matching start_operator's Settings (one watched namespace, no peering):
# the operator's calls are checked against the rules the chart renders for them.
CHART_VALUES = {"rbac": {"mode": "namespaced"}, "watchNamespaces": [NAMESPACE]}


def status(kube, name):
    obj = kube.get_or_none(*FTJ, name, NAMESPACE)
    return (obj or {}).get("status") or {}


def condition(st, ctype):
    return next((c for c in st.get("conditions") or [] if c["type"] == ctype), {})


def events_of(kube, name):
    return [e for e in kube.list("v1", "events", NAMESPACE)
            if (e.get("involvedObject") or {}).get("name") == name]


def ray_jobs(ray_head, prefix):
    req = urllib.request.Request(f"{ray_head.dashboard_url}/api/jobs/", headers=ray_head.headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        jobs = json.loads(resp.read())
    return {j["submission_id"]: j for j in jobs
            if (j.get("submission_id") or "").startswith(prefix)}


def wait_phase(kube, name, phases, timeout):
    phases = (phases,) if isinstance(phases, str) else phases
    return wait_until(lambda: status(kube, name).get("phase") in phases and status(kube, name),
                      timeout, what=lambda: f"{name} to reach {phases}; last status: "
                                            f"{status(kube, name)}")


def healthz(port):
    """kopf's liveness endpoint (with our `jobs` probe), or None while it is not up yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return json.loads(resp.read()) if resp.status == 200 else None
    except OSError:
        return None


def s3_keys(s3_server, uri):
    prefix = uri[len(f"s3://{s3_server.bucket}/"):]
    return s3_server.keys(prefix)


def test_missing_secret_then_run_then_delete(s3_server, tiny_assets, kube, kuberay, ray_head,
                                             start_operator, s3_secret,
                                             tiny_job):
    """(6) a missing S3 Secret is reported and nothing is created until it appears;
    (4) deleting the running job stops its Ray job, deletes its cluster, releases the
    finalizer and keeps its checkpoints."""
    name = "secretless"
    doc = tiny_job(name, training={"maxSteps": 40})
    op = start_operator()
    kube.create(doc, "finetunejobs")

    st = wait_until(lambda: condition(status(kube, name), "Ready").get("reason")
                    == "SecretNotFound" and status(kube, name), 20, what="SecretNotFound")
    assert st["phase"] == "Pending"
    assert "s3-credentials" in condition(st, "Ready")["message"]
    assert kube.get_or_none(*RC, name, NAMESPACE) is None
    assert "SecretNotFound" in [e["reason"] for e in events_of(kube, name)]

    s3_secret()
    cluster = wait_until(lambda: kube.get_or_none(*RC, name, NAMESPACE), 30, what="RayCluster")
    workers = cluster["spec"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["nodeSelector"] == {"pool": "cpu-small"}
    assert cluster["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    uid = kube.get(*FTJ, name, NAMESPACE)["metadata"]["uid"]
    assert cluster["metadata"]["ownerReferences"][0]["uid"] == uid

    # Running, with at least one checkpoint written: then delete it mid-run.
    st = wait_until(lambda: status(kube, name).get("checkpoint") and status(kube, name),
                    240, what=lambda: f"a checkpoint; last status {status(kube, name)}")
    assert st["phase"] == "Running"
    assert condition(st, "Ready")["status"] == "True"
    sub_id = st["rayJobId"]
    assert ray_jobs(ray_head, name)[sub_id]["status"] == "RUNNING"
    checkpoint_uri = st["checkpoint"]["uri"]

    kube.delete(*FTJ, name, NAMESPACE)
    wait_until(lambda: kube.get_or_none(*FTJ, name, NAMESPACE) is None, 60,
               what="the FineTuneJob to be gone (finalizer released)")
    assert kube.get_or_none(*RC, name, NAMESPACE) is None
    wait_until(lambda: ray_jobs(ray_head, name)[sub_id]["status"] == "STOPPED", 30,
               what="the Ray job to be stopped")
    assert list(ray_jobs(ray_head, name)) == [sub_id]  # submitted exactly once
    assert s3_keys(s3_server, checkpoint_uri), "checkpoints are kept"
    op.stop()


def test_bad_input_fails_without_retry_and_keeps_the_log(s3_server, tiny_assets, kube, kuberay,
                                                        ray_head, start_operator,
                                                        s3_secret, tiny_job):
    """A job the trainer refuses (exit code 3: its model.safetensors is truncated, which no
    retry can fix) fails at once with the trainer's reason, without retries, with the log's
    tail in status and the full log next to the checkpoints."""
    name = "badinput"
    s3_secret()
    prefix = f"truncated-{uuid.uuid4().hex[:6]}"
    for file in os.listdir(tiny_assets.model_dir):
        body = Path(tiny_assets.model_dir, file).read_bytes()
        if file == "model.safetensors":
            body = body[: len(body) // 2]
        s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{file}", Body=body)
    model_uri = f"s3://{s3_server.bucket}/{prefix}"
    doc = tiny_job(name, model={"uri": model_uri}, runPolicy={"backoffLimit": 3})
    start_operator()
    kube.create(doc, "finetunejobs")
    st = wait_phase(kube, name, ("Failed", "Succeeded"), 180)
    assert st["phase"] == "Failed", st
    failed = condition(st, "Failed")
    assert failed["reason"] == "BadInput"
    assert f"{model_uri}/model.safetensors" in failed["message"] and "truncated" in failed["message"], failed
    assert st.get("retries", 0) == 0
    assert len(ray_jobs(ray_head, name)) == 1
    assert st["logTail"] and len(st["logTail"].splitlines()) <= 30
    log_key = st["logUri"][len(f"s3://{s3_server.bucket}/"):]
    body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=log_key)["Body"].read()
    assert st["logTail"].splitlines()[-1].encode() in body
    wait_until(lambda: kube.get_or_none(*RC, name, NAMESPACE) is None, 30,
               what="the RayCluster to be deleted (cleanupPolicy DeleteCluster)")
    reasons = [e["reason"] for e in events_of(kube, name)]
    assert "BadInput" in reasons and "JobSubmitted" in reasons


def test_apply_runs_to_success(s3_server, tiny_assets, kube, kuberay, ray_head, start_operator,
                               s3_secret, tiny_job, mlflow_server):
    """(1) apply -> RayCluster on the requested node pool -> real run -> Succeeded, 100 %,
    checkpoint and final model in S3, RayCluster deleted; status and an Event name where the
    metrics are (TensorBoard, the MLflow run on a real server). (What `kubectl get` prints from
    that status is the real API server's: tests/realkube/test_printer_columns.py.)"""
    name = "happy"
    s3_secret()
    doc = tiny_job(name, tracking={"mlflow": {"uri": mlflow_server.uri, "experiment": "operator-e2e"}})
    op = start_operator(liveness_port=free_port())
    assert "jobs" in wait_until(lambda: healthz(op.settings.liveness_port), 20,
                                what="the liveness endpoint")
    # Applied as a person or a GitOps pipeline does it: kubectl, through a kubeconfig.
    applied = kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    assert f"finetunejob.finetune.dev/{name} created" in applied.stdout

    cluster = wait_until(lambda: kube.get_or_none(*RC, name, NAMESPACE), 30, what="RayCluster")
    spec = cluster["spec"]
    assert spec["workerGroupSpecs"][0]["template"]["spec"]["nodeSelector"] == \
        {"pool": "cpu-small"}
    # Token auth on; the token is KubeRay's (its Secret, named after the cluster).
    assert spec["authOptions"] == {"mode": "token"}

    st = wait_phase(kube, name, ("Succeeded", "Failed"), 300)
    assert st["phase"] == "Succeeded", st
    assert st["progress"]["percent"] == 100 and st["progress"]["step"] == 6
    assert st["progress"]["totalSteps"] == 6 and "loss" in st["progress"]
    ckpt_run = f"{doc['spec']['checkpoint']['uri']}/{name}"
    assert st["checkpoint"]["step"] == 6 and st["checkpoint"]["uri"].startswith(ckpt_run)
    assert s3_keys(s3_server, st["checkpoint"]["uri"] + "/")
    assert st["output"]["modelUri"] == f"{ckpt_run}/final"
    assert any(k.endswith("model.safetensors")
               for k in s3_keys(s3_server, st["output"]["modelUri"] + "/"))
    assert st.get("retries", 0) == 0 and st["startTime"] and st["completionTime"]
    assert condition(st, "Succeeded")["status"] == "True"
    assert st["observedGeneration"] == 1
    assert st["progress"]["eta"] == "0s"
    assert st["output"]["lossCurveUri"] == f"{ckpt_run}/loss-curve.png"
    assert s3_keys(s3_server, st["output"]["lossCurveUri"])
    tracked = st["tracking"]
    assert tracked["tensorboardUri"] == f"{ckpt_run}/tensorboard" and s3_keys(s3_server, tracked["tensorboardUri"])
    mlflow_run = mlflow_server.client().get_run(tracked["mlflowRunId"])
    assert mlflow_run.data.tags["finetune.modelUri"] == st["output"]["modelUri"]
    assert tracked["mlflowRunUrl"].startswith(mlflow_server.uri) and tracked["mlflowRunId"] in tracked["mlflowRunUrl"]

    wait_until(lambda: kube.get_or_none(*RC, name, NAMESPACE) is None, 30,
               what="the RayCluster to be deleted (cleanupPolicy DeleteCluster)")
    assert len(ray_jobs(ray_head, name)) == 1
    events = events_of(kube, name)
    reasons = [e["reason"] for e in events]
    for reason in ("ClusterCreating", "JobRunning", "MetricsTracking", "Succeeded"):
        assert reason in reasons, reasons
    (tracking_event,) = [e for e in events if e["reason"] == "MetricsTracking"]
    assert tracked["tensorboardUri"] in tracking_event["message"]
    assert f"MLflow run {tracked['mlflowRunId']} created" in tracking_event["message"]
    # JobSubmitted too, unless Ray said RUNNING already when asked right after the submit
    # (then JobRunning says it); both name the Ray job.
    for e in events:
        if e["reason"] in ("JobSubmitted", "JobRunning"):
            assert st["rayJobId"] in e["message"], e
    # What the operator did through the API stays within the RBAC rules its chart grants.
    assert_calls_granted(kube.recorder.calls_of("operator"), CHART_VALUES)
    metrics = op.metrics()
    assert 'finetune_jobs{phase="Succeeded"} 1.0' in metrics
    assert "finetune_create_to_running_seconds_count 1.0" in metrics
    # Secrets never leave their Secret: not in status, events or the submitted job.
    secret_value = s3_server.client._request_signer._credentials.secret_key
    assert secret_value not in json.dumps(kube.get(*FTJ, name, NAMESPACE))
    assert secret_value not in json.dumps(events_of(kube, name))
    assert secret_value not in json.dumps(ray_jobs(ray_head, name))
    assert ray_head.token not in json.dumps(ray_jobs(ray_head, name))


def test_failed_attempt_is_retried_and_resumes(s3_server, tiny_assets, kube, kuberay, ray_head,
                                                start_operator, s3_secret,
                                                tiny_job):
    """(2) the first attempt crashes after its first checkpoint -> Retrying -> the second
    attempt resumes from it -> Succeeded with status.retries == 1. The operator is replaced
    as soon as the retry is counted: the new one neither counts it again nor submits twice."""
    name = "flaky"
    s3_secret()
    first_op = start_operator(trainer_env=("FINETUNE_FAULT_AFTER_STEP=2",))
    kube.create(tiny_job(name), "finetunejobs")
    wait_until(lambda: status(kube, name).get("retries"), 300,
               what=lambda: f"the first retry; last status {status(kube, name)}")
    first_op.stop()
    start_operator(trainer_env=("FINETUNE_FAULT_AFTER_STEP=2",))
    st = wait_phase(kube, name, ("Succeeded", "Failed"), 400)
    assert st["phase"] == "Succeeded", st
    assert st["retries"] == 1
    jobs = ray_jobs(ray_head, name)
    assert sorted(j["status"] for j in jobs.values()) == ["FAILED", "SUCCEEDED"]
    assert st["rayJobId"].endswith("-a2") and jobs[st["rayJobId"]]["status"] == "SUCCEEDED"
    first = next(sid for sid in jobs if sid.endswith("-a1"))
    assert st["logUri"].endswith(f"/{name}/logs/{first}.log") and st["logTail"]
    resumed = started_event(ray_head, st["rayJobId"])
    assert resumed["resumedFromStep"] == 2
    assert [e["reason"] for e in events_of(kube, name)].count("AttemptFailed") == 1
    # The retry ran on the same RayCluster: one created, none recreated.
    assert len([obj for event, obj in kube.history(*RC)
                if event == "ADDED" and obj["metadata"]["name"] == name]) == 1


def job_log(ray_head, submission_id) -> str:
    req = urllib.request.Request(f"{ray_head.dashboard_url}/api/jobs/{submission_id}/logs",
                                 headers=ray_head.headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["logs"]


def checkpoint_uri(kube, name) -> str:
    return kube.get(*FTJ, name, NAMESPACE)["spec"]["checkpoint"]["uri"]


def started_event(ray_head, submission_id):
    from finetune_api.events import parse_events

    log = job_log(ray_head, submission_id)
    return next(e for e in parse_events(log.splitlines()) if e["event"] == "started")


def test_suspend_and_resume_continue_from_checkpoint(s3_server, tiny_assets, kube, kuberay,
                                                      ray_head, start_operator,
                                                      s3_secret, tiny_job):
    """(3) suspend mid-run -> Ray job stopped, cluster gone, Suspended; resume -> a new
    attempt continues from the checkpoint and succeeds."""
    name = "pausable"
    s3_secret()
    start_operator()
    kube.create(tiny_job(name, training={"maxSteps": 12}), "finetunejobs")
    wait_until(lambda: status(kube, name).get("checkpoint"), 240,
               what=lambda: f"a first checkpoint; last status {status(kube, name)}")
    first = status(kube, name)["rayJobId"]

    # A change to an immutable field while running is refused visibly; the run goes on.
    kube.patch(*FTJ, name, {"spec": {"resources": {"workers": 3}}}, NAMESPACE)
    st = wait_until(lambda: condition(status(kube, name), "SpecAccepted").get("reason")
                    == "ImmutableFieldChanged" and status(kube, name), 20,
                    what="the ImmutableFieldChanged condition")
    assert "spec.resources.workers" in condition(st, "SpecAccepted")["message"]
    assert st["phase"] == "Running" and st["rayJobId"] == first
    assert kube.get(*RC, name, NAMESPACE)["spec"]["workerGroupSpecs"][0]["replicas"] == 1
    kube.patch(*FTJ, name, {"spec": {"resources": {"workers": 1}}}, NAMESPACE)

    kube.patch(*FTJ, name, {"spec": {"runPolicy": {"suspend": True}}}, NAMESPACE)
    st = wait_phase(kube, name, "Suspended", 30)
    assert condition(st, "Suspended")["status"] == "True"
    wait_until(lambda: kube.get_or_none(*RC, name, NAMESPACE) is None, 30,
               what="the RayCluster to be deleted")
    wait_until(lambda: ray_jobs(ray_head, name)[first]["status"] == "STOPPED", 30,
               what="the Ray job to be stopped")
    checkpoint_step = status(kube, name)["checkpoint"]["step"]
    # Stopped, not killed: the trainer had its SIGTERM's time to stop (its one line) and to
    # release its lease, so the resumed attempt takes the location at once.
    assert "finetune-train: stopped at step" in job_log(ray_head, first), job_log(ray_head, first)[-2000:]
    ckpt_run = f"{checkpoint_uri(kube, name)}/{name}"
    assert not s3_keys(s3_server, f"{ckpt_run}/_lease.json"), "the stopped attempt released its lease"

    kube.patch(*FTJ, name, {"spec": {"runPolicy": {"suspend": False}}}, NAMESPACE)
    st = wait_phase(kube, name, ("Succeeded", "Failed"), 300)
    assert st["phase"] == "Succeeded", st
    assert st["rayJobId"] != first and st.get("retries", 0) == 0
    # It continues from the checkpoint the status showed, not from scratch: the trainer
    # announces a checkpoint only once Ray Train registered it, so the resume point is that
    # one or a later one the operator had not read from the log before the stop.
    assert started_event(ray_head, st["rayJobId"])["resumedFromStep"] >= checkpoint_step > 0
    assert st["progress"]["percent"] == 100
    reasons = [e["reason"] for e in events_of(kube, name)]
    assert "Suspended" in reasons and "Resumed" in reasons


def test_operator_restart_mid_run_does_not_duplicate(s3_server, tiny_assets, kube, kuberay,
                                                     ray_head, start_operator,
                                                     s3_secret, tiny_job):
    """(5) the operator is stopped while the job is Provisioning, and again mid-run, and a
    new one takes over each time: no second RayCluster, no second submission, and the job
    still succeeds."""
    name = "phoenix"
    s3_secret()
    provisioning_op = start_operator()
    kube.create(tiny_job(name), "finetunejobs")
    wait_phase(kube, name, ("Provisioning", "Running"), 60)
    # (Events are posted in the background: the one that says the cluster is being created.)
    wait_until(lambda: "ClusterCreating" in [e["reason"] for e in events_of(kube, name)], 30,
               what="the ClusterCreating Event")
    provisioning_op.stop()
    first_op = start_operator()
    wait_phase(kube, name, "Running", 180)
    cluster_uid = kube.get(*RC, name, NAMESPACE)["metadata"]["uid"]
    submissions = list(ray_jobs(ray_head, name))
    first_op.stop()

    start_operator()
    st = wait_phase(kube, name, ("Succeeded", "Failed"), 300)
    assert st["phase"] == "Succeeded", st
    # One submission, run to the end.
    assert submissions == list(ray_jobs(ray_head, name)) == [st["rayJobId"]]
    assert st.get("retries", 0) == 0
    # The same cluster to the end: the API server saw one RayCluster of this name come into
    # being, the one the first operator made, and go once, at the clean-up after the run.
    wait_until(lambda: kube.get_or_none(*RC, name, NAMESPACE) is None, 30,
               what="the RayCluster to be deleted (cleanupPolicy DeleteCluster)")
    changes = [(event, obj["metadata"]["uid"]) for event, obj in kube.history(*RC)
               if obj["metadata"]["name"] == name]
    assert [uid for event, uid in changes if event == "ADDED"] == [cluster_uid], changes
    assert [uid for event, uid in changes if event == "DELETED"] == [cluster_uid], changes
    creates = [e for e in events_of(kube, name) if e["reason"] == "ClusterCreating"]
    assert len(creates) == 1


def _ray_request(ray_head, method, path):
    req = urllib.request.Request(f"{ray_head.dashboard_url}{path}", method=method,
                                 headers=ray_head.headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def test_lost_head_counts_as_a_failed_attempt_and_the_run_resumes(
        s3_server, tiny_assets, kube, kuberay, ray_head, start_operator, s3_secret, tiny_job):
    """The head pod dies mid-run, as the real KubeRay reports it (docs/install.md):
    `HeadPodReady` False with `state` still `ready`, then a new head pod whose Ray has no
    record of the job (the Jobs API answers 404). The attempt counts as failed (RayJobLost),
    the next one gets a new submission id on the same RayCluster and resumes from the
    checkpoint, and the lost attempt's log tail (as the operator last read it) is kept."""
    name = "fragile"
    s3_secret()
    start_operator()
    kube.create(tiny_job(name, training={"maxSteps": 8}), "finetunejobs")
    wait_until(lambda: status(kube, name).get("checkpoint"), 240,
               what=lambda: f"a first checkpoint; last status {status(kube, name)}")
    first = status(kube, name)["rayJobId"]
    cluster_uid = kube.get(*RC, name, NAMESPACE)["metadata"]["uid"]

    kuberay.lose_head(NAMESPACE, name)
    down = wait_until(lambda: (lambda st: st if condition(st, "Ready").get("reason")
                               == "HeadNotReady" else None)(status(kube, name)), 60,
                      what=lambda: f"HeadNotReady; last status {status(kube, name)}")
    assert down["phase"] == "Running" and down.get("retries", 0) == 0  # nothing counted yet
    # The job dies with the head, and the new head knows nothing of it: the shared local head
    # here outlives the "pod", so the test ends the job and removes Ray's record of it.
    _ray_request(ray_head, "POST", f"/api/jobs/{first}/stop")
    wait_until(lambda: _ray_request(ray_head, "GET", f"/api/jobs/{first}")["status"]
               in ("STOPPED", "FAILED", "SUCCEEDED"), 60, what="the first attempt to stop")
    _ray_request(ray_head, "DELETE", f"/api/jobs/{first}")
    kuberay.replace_head(NAMESPACE, name)

    st = wait_phase(kube, name, ("Succeeded", "Failed"), 300)
    assert st["phase"] == "Succeeded", st
    assert st["retries"] == 1 and st["rayJobId"].endswith("-a2")
    assert started_event(ray_head, st["rayJobId"])["resumedFromStep"] > 0
    lost = [e for e in events_of(kube, name) if e["reason"] == "RayJobLost"]
    assert len(lost) == 1 and first in lost[0]["message"], lost
    # The lost attempt's log: the tail the operator had read, with the trainer's own events.
    assert '"event"' in st["logTail"]
    # Recovered on the same RayCluster (KubeRay replaced the head): nothing recreated.
    assert [obj["metadata"]["uid"] for event, obj in kube.history(*RC)
            if event == "ADDED" and obj["metadata"]["name"] == name] == [cluster_uid]


def test_hot_standby_does_nothing_while_the_leader_runs(kube, kuberay, start_operator, tiny_job):
    """Two operators peered under one name: only the higher-priority one touches jobs."""
    kube.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                 "metadata": {"name": "finetune", "namespace": NAMESPACE}}, "kopfpeerings")
    leader_op = start_operator("operator-leader", peering="finetune", priority=100)
    start_operator("operator-standby", peering="finetune", priority=10)
    # Until the standby has seen the leader's record in the peering object it believes it is
    # alone (kopf's peering is eventually consistent); wait for both records, then for the
    # standby's peering watch to deliver them, before giving the pair any work.
    wait_until(lambda: len((kube.get("kopf.dev/v1", "kopfpeerings", "finetune", NAMESPACE)
                            .get("status") or {})) >= 2, 30, what="both peers announced")
    time.sleep(2)
    name = "peered"
    # Suspended from the start: the leader has work to do (status, events) without training.
    kube.create(tiny_job(name, runPolicy={"suspend": True}), "finetunejobs")
    wait_phase(kube, name, "Suspended", 30)
    time.sleep(3)  # several reconcile intervals: a standby that acted would have by now
    standby = kube.recorder.verbs_by_resource("operator-standby")
    leader = kube.recorder.verbs_by_resource("operator-leader")
    assert "patch" in leader.get(("finetune.dev", "finetunejobs/status"), set())
    writes = {res: verbs - {"get", "list", "watch"} for (group, res), verbs in standby.items()
              if group != "kopf.dev"}  # announcing itself in the peering object is all
    assert not any(writes.values()), writes

    # The leader goes away: the standby takes over.
    leader_op.stop()
    kube.create(tiny_job("peered-2", runPolicy={"suspend": True}), "finetunejobs")
    wait_phase(kube, "peered-2", "Suspended", 90)
    standby = kube.recorder.verbs_by_resource("operator-standby")
    assert "patch" in standby.get(("finetune.dev", "finetunejobs/status"), set())
