"""The reconciler's pure helpers: the accepted spec, condition bookkeeping, settings."""

from __future__ import annotations

import json

import pytest

from finetune_operator import phases
from finetune_operator.reconcile import (Reconciler, changed_paths, immutable_view,
                                         merge_conditions)
from finetune_operator.settings import Settings

from operator_jobs import document


def reconciler() -> Reconciler:
    # accepted_spec and cluster_state do no I/O: no session or API needed.
    return Reconciler(Settings(), kube=None, http=None)  # type: ignore[arg-type]


def body_with(phase=None, accepted=None, **changes):
    doc = document(**changes)
    doc["status"] = {"phase": phase} if phase else {}
    if accepted is not None:
        doc["status"]["acceptedSpec"] = json.dumps(accepted)
    return doc


def accepted_spec(body):
    return reconciler().accepted_spec(body["spec"], body["status"])


def test_a_new_job_accepts_its_spec():
    spec, rejected, store = accepted_spec(body_with())
    assert rejected == () and store
    assert spec == document()["spec"]


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
    r = reconciler()
    mine = {"metadata": {"labels": {"finetune.dev/job": "llama"},
                         "ownerReferences": [{"uid": job.uid}]}, "status": {"state": "ready"}}
    assert r.cluster_state(job, mine) == phases.ClusterState.READY
    assert r.cluster_state(job, {**mine, "status": {"state": "failed"}}) == \
        phases.ClusterState.FAILED
    assert r.cluster_state(job, {**mine, "status": {}}) == phases.ClusterState.PROVISIONING
    foreign = {"metadata": {"labels": {}, "ownerReferences": []}}
    assert r.cluster_state(job, foreign) == phases.ClusterState.FOREIGN
    assert r.cluster_state(job, None) == phases.ClusterState.ABSENT


def test_dashboard_url_from_kuberay_status_and_override():
    cluster = {"status": {"head": {"serviceIP": "10.0.0.7"}, "endpoints": {"dashboard": "8265"}}}
    assert reconciler().dashboard_url(cluster) == "http://10.0.0.7:8265"
    r = Reconciler(Settings(dashboard_host="127.0.0.1"), kube=None, http=None)  # type: ignore
    assert r.dashboard_url(cluster) == "http://127.0.0.1:8265"
    assert reconciler().dashboard_url({"status": {}}) is None


def test_settings_from_flags_and_env():
    s = Settings.from_args(["-n", "a,b", "--peering", "ftj", "--trainer-env", "X=1"],
                           {"FINETUNE_OPERATOR_RECONCILE_INTERVAL": "2.5",
                            "FINETUNE_OPERATOR_METRICS_PORT": "0"})
    assert s.namespaces == ("a", "b") and s.peering == "ftj" and not s.clusterwide
    assert s.reconcile_interval == 2.5 and s.metrics_port == 0
    assert s.trainer_env_vars == {"X": "1"}
    assert Settings.from_env({}).clusterwide and Settings.from_env({}).peering is None


def test_trainer_env_carries_the_job_but_no_credentials():
    from finetune_api.model import FineTuneJob

    job = FineTuneJob.from_document(document())
    env = Reconciler(Settings(trainer_env=("A=b",)), kube=None,  # type: ignore[arg-type]
                     http=None).trainer_env(job)  # type: ignore[arg-type]
    assert env["A"] == "b"
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
