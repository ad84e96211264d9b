"""The chart's RBAC against the calls the real operator makes, recorded by the API emulator.

The operator (kopf, in-process) runs against the test bed's emulator as identity `operator`
and takes one FineTuneJob through every path that touches the API without needing Ray: a
missing S3 Secret, the Secret appearing (auth Secret and RayCluster created), the RayCluster
not coming up (no KubeRay here: its pods and KubeRay's Events are read for why), suspension
(RayCluster deleted), a finished job past its TTL (the job deleted, the finalizer removed).
Then every recorded call must be granted by the chart rendered with the same settings, and
every grant must have been used (or be allow-listed with a reason in finetune_testbed/rbac.py).
"""
from __future__ import annotations

import asyncio
import base64
import threading
import time
from typing import Any

import kopf
import pytest

from finetune_operator.main import operator
from finetune_operator.settings import Settings
from finetune_testbed.rbac import assert_rbac_matches

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FTJ = ("finetune.dev/v1alpha1", "finetunejobs")
PEERING = "ft-finetune-operator"  # the chart's default peering name for release "ft"


class Operator:
    def __init__(self, settings: Settings, connection: kopf.ConnectionInfo) -> None:
        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(settings, connection),
                                       daemon=True)

    def _run(self, settings: Settings, connection: kopf.ConnectionInfo) -> None:
        try:
            asyncio.run(operator(settings, connection=connection, stop_flag=self.stop_flag,
                                 ready_flag=self.ready_flag))
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def __enter__(self) -> "Operator":
        self.thread.start()
        assert self.ready_flag.wait(30), f"the operator did not start: {self.error!r}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_flag.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the operator did not stop"


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def job_manifest(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "rbac-probe", "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/tiny"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "resources": {"workers": 1, "gpusPerWorker": 0, "cpusPerWorker": 1,
                          "memoryPerWorker": "1Gi"},
            "checkpoint": {"uri": "s3://checkpoints/runs"},
            "s3": {"secretRef": "s3-credentials"},
        },
    }


MODES = {
    "cluster-peering": ({"replicaCount": 2, "peering": {"enabled": True}},
                        dict(namespaces=(), peering=PEERING)),
    "namespaced": ({"rbac": {"mode": "namespaced"}, "watchNamespaces": ["team-a"]},
                   dict(namespaces=("team-a",), peering=None)),
    "namespaced-peering": ({"rbac": {"mode": "namespaced"}, "watchNamespaces": ["team-a"],
                            "peering": {"enabled": True}},
                           dict(namespaces=("team-a",), peering=PEERING)),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rbac_matches_the_calls_the_operator_makes(kube, mode):
    values, settings_overrides = MODES[mode]
    ns = "team-a"
    kube.create_namespace(ns)
    # The peering objects the chart creates (templates/peering.yaml).
    if settings_overrides["peering"] and not settings_overrides["namespaces"]:
        kube.create({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                     "metadata": {"name": PEERING}}, "clusterkopfpeerings")
    elif settings_overrides["peering"]:
        kube.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                     "metadata": {"name": PEERING, "namespace": ns}}, "kopfpeerings")
    settings = Settings(liveness_port=0, metrics_port=0, reconcile_interval=0.5, tracking_interval=0.5,
                        max_backoff=1.0, log_format="plain", **settings_overrides)
    token = kube.add_identity("operator")
    job = job_manifest(ns)
    with Operator(settings, kopf.ConnectionInfo(server=kube.url, token=token)):
        kube.create(job, FTJ[1])

        def status():
            obj = kube.get_or_none(*FTJ, "rbac-probe", ns)
            return (obj or {}).get("status") or {}

        wait_for(lambda: any(c.get("reason") == "SecretNotFound"
                             for c in status().get("conditions") or []), "SecretNotFound")
        kube.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": "s3-credentials", "namespace": ns},
                     "data": {k: base64.b64encode(b"x").decode()
                              for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}},
                    "secrets")
        wait_for(lambda: kube.get_or_none("ray.io/v1", "rayclusters", "rbac-probe", ns),
                 "the RayCluster")
        # Nothing reconciles it: once it had time to come up the operator reads its pods
        # and Events (reconcile.observe_blocked).
        wait_for(lambda: {("list", c.resource) for c in kube.recorder.calls_of("operator")
                          if c.verb == "list"} >= {("list", "pods"), ("list", "events")},
                 "the operator to look for why the RayCluster does not come up", timeout=30)
        kube.patch(*FTJ, "rbac-probe", {"spec": {"runPolicy": {
            "suspend": True, "ttlSecondsAfterFinished": 0}}}, ns)
        wait_for(lambda: status().get("phase") == "Suspended"
                 and not kube.get_or_none("ray.io/v1", "rayclusters", "rbac-probe", ns),
                 "Suspended without a RayCluster")
        # A finished job past its TTL: the operator deletes it, its finalizer lets it go.
        kube.patch(*FTJ, "rbac-probe", {"status": {
            "phase": "Failed", "completionTime": "2020-01-01T00:00:00Z"}}, ns, subresource="status")
        wait_for(lambda: kube.get_or_none(*FTJ, "rbac-probe", ns) is None,
                 "the job deleted by its TTL")
    calls = kube.recorder.calls_of("operator")
    assert calls, "the emulator recorded no calls for identity 'operator'"
    assert_rbac_matches(calls, values)
