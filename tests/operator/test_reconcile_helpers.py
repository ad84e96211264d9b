"""The pure helpers of a pass: the accepted spec, the cluster's state, the status write,
settings."""

from __future__ import annotations

import json

import pytest

from finetune_operator import observe, phases
from finetune_operator.observe import changed_paths, cluster_state, dashboard_url, immutable_view
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import Settings
from finetune_operator.status_patch import merge_conditions, status_changes

from operator_jobs import document


def body_with(phase=None, accepted=None, **changes):
    doc = document(**changes)
    doc["status"] = {"phase": phase} if phase else {}
    if accepted is not None:
        doc["status"]["acceptedSpec"] = json.dumps(accepted)
    return doc


def accepted_spec(body):
    return observe.accepted_spec(body["spec"], body["status"])


def test_a_new_job_accepts_its_spec():
    spec, rejected, store = accepted_spec(body_with())
    assert rejected == () and json.loads(store) == immutable_view(document()["spec"])
    assert spec == document()["spec"]


def test_a_stored_spec_is_not_stored_again():
    accepted = immutable_view(document()["spec"])
    assert accepted_spec(body_with("Pending", accepted))[2] is None


def test_immutable_change_while_running_is_rejected_and_the_old_spec_stays():
    accepted = immutable_view(document()["spec"])
    body = body_with("Running", accepted, **{"spec.resources.workers": 8,
                                             "spec.runPolicy.backoffLimit": 5})
    spec, rejected, store = accepted_spec(body)
    assert rejected == ("spec.resources.workers",) and not store
    assert spec["resources"]["workers"] == 4          # the run keeps its spec
    assert spec["runPolicy"]["backoffLimit"] == 5      # runPolicy stays mutable


def test_run_policy_changes_are_accepted_while_running():
    accepted = immutable_view(document()["spec"])
    body = body_with("Running", accepted, **{"spec.runPolicy.suspend": True})
    spec, rejected, store = accepted_spec(body)
    assert rejected == () and not store and spec["runPolicy"]["suspend"] is True


@pytest.mark.parametrize("phase", ["Pending", "Suspended"])
def test_changes_are_accepted_while_nothing_runs(phase):
    accepted = immutable_view(document()["spec"])
    body = body_with(phase, accepted, **{"spec.resources.workers": 8})
    spec, rejected, store = accepted_spec(body)
    assert rejected == () and store and spec["resources"]["workers"] == 8


def test_changed_paths_names_leaves():
    assert changed_paths({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == \
        ["spec.a.c", "spec.d"]


def test_condition_transition_time_moves_only_when_status_flips():
    old = [{"type": "Ready", "status": "False", "reason": "ClusterCreating", "message": "m",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    same = merge_conditions(old, [phases.Condition("Ready", "False", "ClusterProvisioning",
                                                   "m2")], 1, "2026-01-02T00:00:00Z")
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same[0]["reason"] == "ClusterProvisioning"
    flipped = merge_conditions(old, [phases.Condition("Ready", "True", "ClusterReady", "ok")],
                               2, "2026-01-03T00:00:00Z")
    assert flipped[0]["lastTransitionTime"] == "2026-01-03T00:00:00Z"
    assert flipped[0]["observedGeneration"] == 2


def test_cluster_state_checks_ownership():
    from finetune_api.model import FineTuneJob

    job = FineTuneJob.from_document(document())
    mine = {"metadata": {"labels": {"finetune.dev/job": "llama"},
                         "ownerReferences": [{"uid": job.uid}]}, "status": {"state": "ready"}}

    def state(cluster):
        return cluster_state(cluster, job.name, job.uid)

    assert state(mine) == phases.ClusterState.READY
    # As KubeRay >= 1.2 reports (docs/install.md, tests/realkube/test_kuberay_reports.py):
    # a dead head turns HeadPodReady False and leaves `state: ready`.
    def conds(head, provisioned):
        return [{"type": "HeadPodReady", "status": head},
                {"type": "RayClusterProvisioned", "status": provisioned}]
    assert state({**mine, "status": {"state": "ready", "conditions": conds("True", "True")}}) \
        == phases.ClusterState.READY
    assert state({**mine, "status": {"state": "ready", "conditions": conds("False", "True")}}) \
        == phases.ClusterState.HEAD_DOWN
    # Not up yet (never provisioned): still coming up, not a lost head.
    assert state({**mine, "status": {"conditions": conds("False", "False")}}) \
        == phases.ClusterState.PROVISIONING
    assert state({**mine, "status": {}}) == phases.ClusterState.PROVISIONING
    going = {**mine, "metadata": {**mine["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert state(going) == phases.ClusterState.PROVISIONING
    foreign = {"metadata": {"labels": {}, "ownerReferences": []}}
    assert state(foreign) == phases.ClusterState.FOREIGN
    labelled_not_owned = {**mine, "metadata": {**mine["metadata"], "ownerReferences": []}}
    assert state(labelled_not_owned) == phases.ClusterState.FOREIGN
    assert state(None) == phases.ClusterState.ABSENT


def test_kuberays_words_on_a_cluster_that_does_not_come_up():
    from finetune_operator.observe import refusal, replica_failure, unschedulable

    failing = {"status": {"conditions": [{"type": "ReplicaFailure", "status": "True",
                                          "reason": "FailedCreateHeadPod",
                                          "message": "no PriorityClass with name x"}]}}
    assert replica_failure(failing) == "FailedCreateHeadPod: no PriorityClass with name x"
    assert replica_failure({"status": {}}) == ""
    pod = {"metadata": {"name": "w-1"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]}}
    bound = {"metadata": {"name": "h-0"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "True"}]}}
    assert unschedulable([bound, pod]) == \
        "pod w-1: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    assert unschedulable([bound]) == ""
    events = [{"reason": "InvalidRayClusterSpec", "message": "old", "involvedObject": {"uid": "u0"},
               "lastTimestamp": "2026-01-01T00:00:02Z"},
              {"reason": "InvalidRayClusterSpec", "message": "bad spec",
               "involvedObject": {"uid": "u1"}, "lastTimestamp": "2026-01-01T00:00:01Z"},
              {"reason": "Created", "message": "x", "involvedObject": {"uid": "u1"}}]
    # Only this cluster's (uid) refusals: an earlier cluster of the name said nothing of it.
    assert refusal(events, "u1") == "InvalidRayClusterSpec: bad spec"
    assert refusal(events, "u2") == ""


def test_the_token_is_the_one_kuberay_made_for_this_very_cluster():
    import base64

    from finetune_operator.observe import cluster_token
    from finetune_operator.raycluster import check_name

    def secret(owner_uid):
        return {"metadata": {"ownerReferences": [{"kind": "RayCluster", "uid": owner_uid}]},
                "data": {"auth_token": base64.b64encode(b"t0k").decode()}}
    cluster = {"metadata": {"uid": "new"}}
    assert cluster_token(secret("new"), cluster) == "t0k"
    # The Secret of an earlier cluster of the same name, not yet garbage-collected.
    assert cluster_token(secret("old"), cluster) is None
    assert cluster_token(None, cluster) is None
    # KubeRay's CheckName (the Secret's name): what the validator admits passes unchanged.
    assert check_name("llama") == "llama"
    assert check_name("1abc") == "rabc"
    assert check_name("x" * 10 + "y" * 45) == "x" * 5 + "y" * 45


def test_dashboard_url_from_kuberay_status_and_override():
    cluster = {"status": {"head": {"serviceIP": "10.0.0.7"}, "endpoints": {"dashboard": "8265"}}}
    assert dashboard_url(cluster) == "http://10.0.0.7:8265"
    assert dashboard_url(cluster, "127.0.0.1") == "http://127.0.0.1:8265"
    assert dashboard_url({"status": {}}) is None


NOW = "2026-11-24T12:00:00Z"
STATUS_TABLE = [
    # id, status before, decision, observed, model uri, generation, the changes written
    ("nothing new, nothing written",
     {"phase": "Running", "message": "m", "observedGeneration": 1},
     phases.Decision(phase="Running", message="m"), {}, None, 1, {}),
    ("a transition writes phase, message and the decision's fields",
     {}, phases.Decision(phase="Provisioning", message="Creating the RayCluster",
                         status={"acceptedSpec": "{}"}),
     {"rayCluster": "llama"}, None, 1,
     {"phase": "Provisioning", "message": "Creating the RayCluster", "observedGeneration": 1,
      "acceptedSpec": "{}", "rayCluster": "llama"}),
    ("no cluster and none before: no rayCluster: null",
     {"phase": "Pending", "message": "m", "observedGeneration": 1},
     phases.Decision(phase="Pending", message="m"), {"rayCluster": None}, None, 1, {}),
    ("the cluster went: rayCluster cleared",
     {"phase": "Suspended", "message": "m", "observedGeneration": 1, "rayCluster": "llama"},
     phases.Decision(phase="Suspended", message="m"), {"rayCluster": None}, None, 1,
     {"rayCluster": None}),
    ("the decision's fields win over the observed ones",
     {"phase": "Running", "message": "m", "observedGeneration": 1},
     phases.Decision(phase="Running", message="m", status={"logUri": None}),
     {"logUri": "s3://x"}, None, 1, {}),
    ("success records the model and 100 %",
     {"phase": "Running", "message": "m", "observedGeneration": 1,
      "progress": {"step": 90, "totalSteps": 100, "percent": 90}},
     phases.Decision(phase="Succeeded", message="done"), {}, {"modelUri": "s3://ckpt/llama/final"}, 1,
     {"phase": "Succeeded", "message": "done",
      "output": {"modelUri": "s3://ckpt/llama/final"},
      "progress": {"step": 100, "totalSteps": 100, "percent": 100}}),
    ("success of an adapter job records the adapter (and the merged model when there is one)",
     {"phase": "Running", "message": "m", "observedGeneration": 1},
     phases.Decision(phase="Succeeded", message="done"), {},
     {"adapterUri": "s3://ckpt/llama/adapter"}, 1,
     {"phase": "Succeeded", "message": "done", "output": {"adapterUri": "s3://ckpt/llama/adapter"},
      "progress": {"percent": 100}}),
    ("a model the trainer reported is kept",
     {"phase": "Running", "message": "m", "observedGeneration": 1},
     phases.Decision(phase="Succeeded", message="done"), {"output": {"modelUri": "s3://own"}},
     {"modelUri": "s3://ckpt/llama/final"}, 1,
     {"phase": "Succeeded", "message": "done", "output": {"modelUri": "s3://own"},
      "progress": {"percent": 100}}),
    ("a new generation is written even without news",
     {"phase": "Running", "message": "m", "observedGeneration": 1},
     phases.Decision(phase="Running", message="m"), {}, None, 2, {"observedGeneration": 2}),
]


@pytest.mark.parametrize("status,decision,observed,outputs,generation,changes",
                         [row[1:] for row in STATUS_TABLE], ids=[row[0] for row in STATUS_TABLE])
def test_status_changes(status, decision, observed, outputs, generation, changes):
    assert status_changes(status, decision, generation=generation, now=NOW, observed=observed,
                          outputs=outputs) == changes


def test_status_changes_merge_conditions():
    status = {"phase": "Provisioning", "message": "m", "observedGeneration": 1,
              "conditions": [{"type": "Ready", "status": "False", "reason": "ClusterCreating",
                              "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z",
                              "observedGeneration": 1}]}
    d = phases.Decision(phase="Provisioning", message="m", conditions=[
        phases.Condition("Ready", "True", "ClusterReady", "The RayCluster is ready")])
    (cond,) = status_changes(status, d, generation=1, now=NOW)["conditions"]
    assert cond["status"] == "True" and cond["lastTransitionTime"] == NOW


def test_settings_from_flags_and_env():
    s = Settings.from_args(["-n", "a,b", "--peering", "ftj", "--trainer-env", "X=1"],
                           {"FINETUNE_OPERATOR_RECONCILE_INTERVAL": "2.5",
                            "FINETUNE_OPERATOR_METRICS_PORT": "0"})
    assert s.namespaces == ("a", "b") and s.peering == "ftj" and not s.clusterwide
    assert s.reconcile_interval == 2.5 and s.metrics_port == 0
    assert s.trainer_env_vars == {"X": "1"}
    assert Settings.from_env({}).clusterwide and Settings.from_env({}).peering is None


def test_trainer_env_carries_the_job_and_its_attempt_but_no_credentials():
    from finetune_api.model import FineTuneJob

    job = FineTuneJob.from_document(document())
    # trainer_env does no I/O: no session or API needed.
    env = Reconciler(Settings(trainer_env=("A=b",)), kube=None,  # type: ignore[arg-type]
                     http=None).trainer_env(job, "llama-1234abcd-a2")  # type: ignore[arg-type]
    assert env["A"] == "b"
    assert env["FINETUNE_ATTEMPT"] == "llama-1234abcd-a2"  # the lease tells earlier attempts by it
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == "60"  # a stopped trainer stops cleanly
    submitted = json.loads(env["FINETUNE_JOB"])
    assert submitted["spec"]["s3"]["secretRef"] == "s3-credentials"
    assert FineTuneJob.from_document(submitted).spec == job.spec
    assert not any(k.startswith("AWS_") for k in env)


def test_operator_registers_no_change_handlers():
    """main.NoDiffBase skips kopf's diff-base, which only create/update/delete/resume
    handlers read: adding one of those must bring the diff-base back first."""
    from finetune_operator.main import NoDiffBase, build_registry
    registry = build_registry()
    assert list(registry._changing._handlers) == []
    assert NoDiffBase().build(body={"spec": {}}) is None


def test_cluster_watch_wakes_a_job_for_what_changes_its_decision():
    from finetune_operator.kube import KubeClient
    from finetune_operator.reconcile import Reconciler
    from finetune_operator.settings import Settings

    reconciler = Reconciler(Settings(), KubeClient(None), http=None)
    mem = reconciler.mem("ns/llama")

    def event(kind="MODIFIED", state=None, head=None, provisioned=None, failure=False):
        conditions = [{"type": t, "status": v} for t, v in
                      (("HeadPodReady", head), ("RayClusterProvisioned", provisioned)) if v]
        if failure:
            conditions.append({"type": "ReplicaFailure", "status": "True",
                               "reason": "FailedCreateHeadPod", "message": "refused"})
        mem.wake.clear()
        reconciler.cluster_event(kind, {
            "metadata": {"name": "llama", "namespace": "ns",
                         "labels": {"finetune.dev/job": "llama"}},
            "status": {"state": state, "conditions": conditions} if state or conditions
            else {}})
        return mem.wake.is_set()

    assert not event("ADDED")                                   # created: nothing to do yet
    assert not event(head="False", provisioned="False")         # KubeRay's first conditions
    assert event(failure=True)                                  # pods refused: say so
    assert event(state="ready", head="True", provisioned="True")
    assert not event(state="ready", head="True", provisioned="True")  # a repeat
    assert event(state="ready", head="False", provisioned="True")    # the head went down
    assert event(state="ready", head="True", provisioned="True")     # and came back
    assert event("DELETED")
