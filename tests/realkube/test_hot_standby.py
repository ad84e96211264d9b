"""Two replicas of the operator as the chart deploys them with `peering.enabled` and
`replicaCount: 2`, on the real API server: kopf peering through the chart's KopfPeering
object, each replica with its ServiceAccount's token and the chart's RBAC (namespaced mode:
the peering grants included). Only the higher-priority replica acts; when it goes, the
standby takes over. The Events name the replica that acted (reportingInstance: its pod)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import yaml

from api.cases import make
from finetune_testbed.chart_install import install_rbac, render_release, start_operator

from .waiting import wait_for

pytestmark = pytest.mark.realkube

PEERING_CRD = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator" / "crds" / "kopf.dev_peerings.yaml"


def _suspended_job(ns: str, name: str) -> dict:
    # Suspended from the start: work for the active replica (status, an Event), no pods.
    return make(**{"metadata": {"name": name, "namespace": ns},
                   "spec.resources.workers": 1, "spec.runPolicy.suspend": True})


def test_only_the_leader_acts_and_the_standby_takes_over(kubestack):
    suffix = uuid.uuid4().hex[:5]
    ns = f"standby-{suffix}"
    release = render_release({"peering": {"enabled": True}, "replicaCount": 2,
                              "rbac": {"mode": "namespaced"}, "watchNamespaces": [ns]},
                             name=f"ft{suffix}", namespace=f"ft-system-{suffix}")
    kubestack.kubectl("apply", "--server-side", "-f", str(PEERING_CRD))
    install_rbac(kubestack, release)
    kubestack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    peerings = release.of_kind("KopfPeering")
    assert [p["metadata"]["namespace"] for p in peerings] == [ns]
    kubestack.apply(peerings)
    peering = peerings[0]["metadata"]["name"]
    token = kubestack.service_account_token(release.namespace, release.service_account)

    def replica(pod: str, priority: int):
        # The chart's container draws its priority at start; here it is fixed, so which one
        # leads is known.
        return start_operator(kubestack, release, token, extra_env={
            "POD_ID": pod, "FINETUNE_OPERATOR_PRIORITY": str(priority),
            "FINETUNE_OPERATOR_RECONCILE_INTERVAL": "1"})
    leader_pod, standby_pod = f"{release.name}-leader", f"{release.name}-standby"
    leader, standby = replica(leader_pod, 100), replica(standby_pod, 10)
    try:
        wait_for("both replicas in the peering object", lambda: len(
            kubestack.get("kopfpeering", "-n", ns, peering).get("status") or {}) >= 2, timeout=60)
        time.sleep(2)  # the standby's peering watch delivers the leader's record

        def handled_by(name: str) -> str | None:
            phase = (kubestack.get("finetunejob", "-n", ns, name).get("status") or {}).get("phase")
            if phase != "Suspended":
                return None
            events = [e for e in kubestack.get("events", "-n", ns)["items"]
                      if e["involvedObject"]["name"] == name and e["reason"] == "Suspended"]
            return events[0]["reportingInstance"] if events else None

        kubestack.kubectl("apply", "-f", "-", input=yaml.safe_dump(_suspended_job(ns, "first")))
        assert wait_for("the first job handled", lambda: handled_by("first"), timeout=60) == leader_pod
        time.sleep(3)  # several reconcile intervals: a standby that acted would have by now
        events = [e for e in kubestack.get("events", "-n", ns)["items"]
                  if e["involvedObject"].get("kind") == "FineTuneJob"]
        assert {e["reportingInstance"] for e in events} == {leader_pod}, events
        assert f"{ns}/first" not in standby.text(), standby.text()[-2000:]

        # The leader goes (SIGTERM: kopf leaves the peering); the standby takes over.
        leader.stop()
        kubestack.kubectl("apply", "-f", "-", input=yaml.safe_dump(_suspended_job(ns, "second")))
        assert wait_for("the second job handled", lambda: handled_by("second"),
                        timeout=90) == standby_pod
        assert standby.proc.poll() is None, standby.text()[-2000:]
    finally:
        leader.stop()
        standby.stop()
