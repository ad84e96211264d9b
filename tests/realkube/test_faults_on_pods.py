"""The operator under a real fault on real pods (issue: the operator under real faults,
scenario 1): the head pod's Ray is OOM-killed mid-run by the process kubelet, as the kernel
would kill it. The real KubeRay sees the head container restart; the new head's Ray knows
nothing of the job. The attempt counts as failed (RayJobLost), the next one resumes from the
latest complete checkpoint on the same RayCluster, and the job succeeds."""

from __future__ import annotations

import json

import pytest
import yaml

from .on_pods import operator_on_pods
from .waiting import wait_for

pytestmark = [pytest.mark.realkube, pytest.mark.e2e, pytest.mark.timeout(1500)]


def _metrics_attempts(s3_server, run_prefix: str) -> list[dict]:
    """The first line of each attempt's metrics log (metrics/<attempt>.jsonl): the attempt."""
    out = []
    for key in s3_server.keys(f"{run_prefix}/metrics/"):
        if key.endswith(".jsonl"):
            body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            out.append({**lines[0], "steps": [r["step"] for r in lines if r.get("kind") == "step"]})
    return sorted(out, key=lambda a: a["resumedFromStep"])


def test_head_oom_killed_mid_run_is_a_counted_retry_that_resumes(kubestack, kubelet, s3_server, tiny_assets):
    name = "headkill"
    with operator_on_pods(kubestack, kubelet, "headkill") as env:
        ns = env.ns
        # Long enough to be killed mid-run (a checkpoint every 10 steps costs about a second).
        doc = env.job(name, s3_server, tiny_assets, {
            "training": {"maxSteps": 200, "epochs": 10},
            "checkpoint": {"everySteps": 10, "keep": 2},
            "runPolicy": {"backoffLimit": 1}})

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
        st = wait_for("the job to finish", lambda: (lambda s: s if s.get("phase") in
                      ("Succeeded", "Failed") else None)(status()), timeout=900, interval=2)
        assert st["phase"] == "Succeeded", (st, env.operator.text()[-3000:])
        assert st["retries"] == 1 and st["rayJobId"] != first and st["progress"]["step"] == 200
        events = kubestack.get("events", "-n", ns, "--field-selector",
                               f"involvedObject.name={name}")["items"]
        lost = [e for e in events if e["reason"] == "RayJobLost"]
        assert len(lost) == 1 and first in lost[0]["message"], [e["reason"] for e in events]
        # The head container restarted inside its pod: the attempt went on the same
        # RayCluster (created once; cleanupPolicy DeleteCluster has removed it by now).
        assert env.operator.text().count(f"Created RayCluster {ns}/{name}") == 1, env.operator.text()[-3000:]
        # The second attempt resumed from a checkpoint at least as late as the one complete
        # when the head died, and trained on from there: nothing before it twice.
        run_prefix = f"{doc['spec']['checkpoint']['uri']}/{name}"[len(f"s3://{s3_server.bucket}/"):]
        attempts = _metrics_attempts(s3_server, run_prefix)
        assert len(attempts) == 2, attempts
        resumed = attempts[1]
        assert resumed["resumedFromStep"] >= killed_after > 0, (resumed, killed_after)
        assert resumed["steps"][0] == resumed["resumedFromStep"] + 1 and resumed["steps"][-1] == 200
        assert env.operator.proc.poll() is None, env.operator.text()[-3000:]
    assert not env.forbidden(), env.forbidden()
