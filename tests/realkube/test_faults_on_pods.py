"""The operator under real faults on real pods (issue: the operator under real faults,
scenarios 1 and 2), in one run to spare the start-ups: the process kubelet OOM-kills, as the
kernel would, first the head's Ray and then, in the next attempt, a worker's.

- The head: the real KubeRay sees the head container restart; the new head's Ray knows
  nothing of the job. The attempt counts as failed (RayJobLost), and the next one, on the
  same RayCluster, waits out the dead driver's lease and resumes from the latest complete
  checkpoint.
- A worker: Ray Train's workers are not restarted in place (FailureConfig max_failures=0:
  retries are the operator's, runPolicy.backoffLimit), so the attempt fails naming the dead
  worker, is counted, and the next attempt resumes once the kubelet has restarted the
  worker's container and its Ray has rejoined.
"""

from __future__ import annotations

import pytest
import yaml

from .on_pods import operator_on_pods
from .waiting import wait_for

pytestmark = [pytest.mark.realkube, pytest.mark.e2e, pytest.mark.timeout(1500)]


def _metrics_attempts(s3_server, run_prefix: str) -> list:
    """Each attempt's metrics log (metrics/<attempt>.jsonl) as the loss curve reads it, in the
    order of their resume steps."""
    from finetune_trainer.loss_curve import parse_attempt

    out = []
    for key in s3_server.keys(f"{run_prefix}/metrics/"):
        if key.endswith(".jsonl"):
            body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
            out.append(parse_attempt(key.rsplit("/", 1)[1][:-len(".jsonl")], body.decode()))
    return sorted(out, key=lambda a: a.resumed_from)


def test_head_then_worker_oom_killed_mid_run_are_counted_retries_that_resume(kubestack, kubelet, s3_server, tiny_assets):
    name = "headkill"
    with operator_on_pods(kubestack, kubelet, "headkill") as env:
        ns = env.ns
        # Long enough to be killed mid-run (a checkpoint every 10 steps costs about a second).
        doc = env.job(name, s3_server, tiny_assets, {
            "training": {"maxSteps": 200, "epochs": 10},
            "checkpoint": {"everySteps": 10, "keep": 2},
            "runPolicy": {"backoffLimit": 2}})

        def status() -> dict:
            return kubestack.get("finetunejob", "-n", ns, name).get("status") or {}
        kubestack.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        st = wait_for("a first checkpoint on real pods",
                      lambda: (lambda s: s if s.get("checkpoint") or s.get("phase") in
                               ("Succeeded", "Failed") else None)(status()), timeout=900, interval=1)
        assert st["phase"] == "Running" and st.get("retries", 0) == 0, st
        first, killed_after = st["rayJobId"], st["checkpoint"]["step"]
        head = next(p for p in kubestack.get("pods", "-n", ns, "-l", "ray.io/node-type=head")["items"])
        kubelet.oom_kill(ns, head["metadata"]["name"], "ray-head")

        retried = wait_for("the lost attempt to be counted",
                           lambda: (lambda s: s if s.get("retries") or s.get("phase") in
                                    ("Succeeded", "Failed") else None)(status()),
                           timeout=300, interval=1)
        assert retried.get("retries") == 1 and retried["phase"] != "Failed", retried
        second = retried["rayJobId"]
        # The second attempt's first own checkpoint, then its worker dies.
        st = wait_for("the second attempt's first checkpoint", lambda: (lambda s: s if (
            s.get("rayJobId") == second and s.get("checkpoint", {}).get("step", 0) > killed_after
            and s.get("phase") == "Running") or s.get("phase") in ("Succeeded", "Failed") or
            s.get("retries", 0) > 1 else None)(status()), timeout=600, interval=1)
        assert st["phase"] == "Running" and st["retries"] == 1, st
        worker_killed_after = st["checkpoint"]["step"]
        worker = next(p for p in kubestack.get("pods", "-n", ns, "-l", "ray.io/node-type=worker")["items"])
        kubelet.oom_kill(ns, worker["metadata"]["name"], "ray-worker")
        st = wait_for("the job to finish", lambda: (lambda s: s if s.get("phase") in
                      ("Succeeded", "Failed") else None)(status()), timeout=900, interval=2)
        assert st["phase"] == "Succeeded", (st, env.operator.text()[-3000:])
        assert st["retries"] == 2 and st["rayJobId"] not in (first, second) and st["progress"]["step"] == 200
        events = kubestack.get("events", "-n", ns, "--field-selector",
                               f"involvedObject.name={name}")["items"]
        lost = [e for e in events if e["reason"] == "RayJobLost"]
        assert len(lost) == 1 and first in lost[0]["message"], [e["reason"] for e in events]
        failed = [e for e in events if e["reason"] == "AttemptFailed"]
        assert len(failed) == 1 and "worker" in failed[0]["message"], failed
        # The head container restarted inside its pod: the attempt went on the same
        # RayCluster (created once; cleanupPolicy DeleteCluster has removed it by now).
        assert env.operator.text().count(f"Created RayCluster {ns}/{name}") == 1, env.operator.text()[-3000:]
        # Each later attempt resumed from a checkpoint at least as late as the one complete
        # when the previous attempt's pod died, and trained on from there: no step before that
        # checkpoint was trained twice.
        run_prefix = f"{doc['spec']['checkpoint']['uri']}/{name}"[len(f"s3://{s3_server.bucket}/"):]
        attempts = _metrics_attempts(s3_server, run_prefix)
        assert len(attempts) == 3, attempts
        for resumed, died_after in zip(attempts[1:], (killed_after, worker_killed_after)):
            assert resumed.resumed_from >= died_after > 0, (resumed.name, resumed.resumed_from, died_after)
            assert min(resumed.steps) == resumed.resumed_from + 1, (resumed.name, sorted(resumed.steps))
        assert max(attempts[2].steps) == 200
        assert env.operator.proc.poll() is None, env.operator.text()[-3000:]
    assert not env.forbidden(), env.forbidden()
