"""The operator stops a running trainer on real pods (issue: the operator under real faults,
scenario 5, and suspension), in one run: suspended mid-run, resumed, then past its
activeDeadlineSeconds.

When the operator deletes a RayCluster whose Ray job still runs, the pods' deletion kills the
driver along with its head: no `stopped at step N`, and the run's lease on its checkpoint
location is left to go stale, so the next run of the job (resumed, or the same job applied
again) waits out or is refused for the stale time. So the operator stops the Ray job first
(the trainer gets Ray's stop grace, RAY_JOB_STOP_WAIT_TIME_S, to abort and release its lease)
and deletes the cluster once Ray says the job is over.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from .on_pods import operator_on_pods
from .waiting import wait_for

pytestmark = [pytest.mark.realkube, pytest.mark.e2e, pytest.mark.timeout(1200)]


def test_suspend_and_deadline_stop_the_trainer_before_its_pods_go(kubestack, kubelet, s3_server, tiny_assets):
    name = "stopper"
    with operator_on_pods(kubestack, kubelet, "stopper") as env:
        ns = env.ns
        doc = env.job(name, s3_server, tiny_assets, {
            "training": {"maxSteps": 5000, "epochs": 100},
            "checkpoint": {"everySteps": 10, "keep": 2}})
        run_prefix = f"{doc['spec']['checkpoint']['uri']}/{name}"[len(f"s3://{s3_server.bucket}/"):]
        lease = f"{run_prefix}/_lease.json"

        def status() -> dict:
            return kubestack.get("finetunejob", "-n", ns, name).get("status") or {}

        def pods() -> list[str]:
            return [p["metadata"]["name"] for p in kubestack.get("pods", "-n", ns)["items"]]

        def clusters() -> list[str]:
            return [c["metadata"]["uid"] for c in kubestack.get("rayclusters", "-n", ns)["items"]]

        def run_policy(**fields) -> None:
            kubestack.kubectl("patch", "finetunejob", "-n", ns, name, "--type", "merge",
                              "-p", json.dumps({"spec": {"runPolicy": fields}}))

        def checkpoint_after(step: int, sub_id: str | None = None) -> dict:
            return wait_for(f"a checkpoint after step {step}", lambda: (lambda s: s if (
                s.get("checkpoint", {}).get("step", 0) > step and s.get("phase") == "Running"
                and (sub_id is None or s.get("rayJobId") == sub_id)) or s.get("phase") in (
                "Succeeded", "Failed") else None)(status()), timeout=900, interval=1)

        kubestack.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        st = checkpoint_after(0)
        assert st["phase"] == "Running", st
        first = st["rayJobId"]
        assert s3_server.keys(lease), "the running attempt holds its lease"

        # Suspended: the trainer stops (Ray's stop, then its abort) before its pods go.
        run_policy(suspend=True)
        st = wait_for("Suspended with its pods gone", lambda: (lambda s: s if s.get("phase") ==
                      "Suspended" and not clusters() and not pods() else None)(status()),
                      timeout=180, interval=1)
        assert not s3_server.keys(lease), "the stopped attempt released its lease"
        suspended_at = st["checkpoint"]["step"]

        # Resumed: a new attempt on a new cluster (the lease is free: nothing to wait out)
        # continues from the checkpoint.
        run_policy(suspend=False)
        st = wait_for("the resumed attempt running", lambda: (lambda s: s if (
            s.get("phase") == "Running" and s.get("rayJobId") != first
            and s.get("progress", {}).get("step", 0) > suspended_at) or s.get("phase") in (
            "Succeeded", "Failed") else None)(status()), timeout=600, interval=1)
        assert st["phase"] == "Running", st
        second = st["rayJobId"]
        st = checkpoint_after(st["checkpoint"]["step"], second)
        assert st["phase"] == "Running" and st.get("retries", 0) == 0, st

        # Past its deadline (runPolicy may change while the job runs): Failed, the trainer
        # stopped, the cluster and its pods gone, nothing recreated, the checkpoints kept.
        run_policy(activeDeadlineSeconds=1)
        st = wait_for("Failed with its pods gone", lambda: (lambda s: s if s.get("phase") ==
                      "Failed" and not clusters() and not pods() else None)(status()),
                      timeout=180, interval=1)
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert failed["status"] == "True" and failed["reason"] == "DeadlineExceeded", failed
        assert "activeDeadlineSeconds=1" in failed["message"], failed
        assert not s3_server.keys(lease), "the attempt stopped at its deadline released its lease"
        time.sleep(10)  # several reconcile intervals
        assert not clusters() and not pods() and status()["phase"] == "Failed"
        assert s3_server.keys(f"{run_prefix}/checkpoint_step"), "the checkpoints stay"
        log = env.operator.text()
        assert log.count(f"Created RayCluster {ns}/{name}") == 2, log[-3000:]
        assert env.operator.proc.poll() is None, log[-3000:]
    assert not env.forbidden(), env.forbidden()
