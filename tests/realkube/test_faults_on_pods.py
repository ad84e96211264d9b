"""The operator under real faults on real pods (issue: the operator under real faults,
scenarios 1, 2 and 6). The process kubelet OOM-kills, as the kernel would, the head's Ray
or a worker's; one run holds several faults, to spare the start-ups.

- The head: the real KubeRay sees the head container restart; the new head's Ray knows
  nothing of the job. The attempt counts as failed (RayJobLost), and the next one, on the
  same RayCluster, waits out the dead driver's lease and resumes from the latest complete
  checkpoint.
- A worker: Ray Train's workers are not restarted in place (FailureConfig max_failures=0:
  retries are the operator's, runPolicy.backoffLimit), so the attempt fails naming the dead
  worker, is counted, and the next attempt resumes once the kubelet has restarted the
  worker's container and its Ray has rejoined.
- A head lost in every attempt: Failed after exactly runPolicy.backoffLimit retries
  (BackoffLimitExceeded), the last attempt's log kept (its tail in status, the whole in S3),
  as the operator last read it: its head had forgotten it.
- The operator itself (scenario 6) is SIGKILLed and replaced once in each phase the run
  passes through: Provisioning (its RayCluster just created), Running (just as the head
  dies) and Retrying (the lost attempt counted, the next not yet running). Still one
  RayCluster, each attempt submitted once, and no retry lost or counted twice.
"""

from __future__ import annotations

import re

import pytest
import yaml

from finetune_api.events import parse_events

from .on_pods import metrics_attempts, operator_on_pods
from .waiting import wait_for

pytestmark = [pytest.mark.realkube, pytest.mark.e2e, pytest.mark.timeout(1500)]


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

        def cluster_uids() -> list[str]:
            return [c["metadata"]["uid"] for c in kubestack.get("rayclusters", "-n", ns)["items"]
                    if c["metadata"]["name"] == name]
        uids = wait_for("its RayCluster while Provisioning",
                        lambda: status().get("phase") == "Provisioning" and cluster_uids(),
                        timeout=120, interval=0.5)
        env.crash_operator()
        st = wait_for("a first checkpoint on real pods",
                      lambda: (lambda s: s if s.get("checkpoint") or s.get("phase") in
                               ("Succeeded", "Failed") else None)(status()), timeout=900, interval=1)
        assert st["phase"] == "Running" and st.get("retries", 0) == 0, st
        first, killed_after = st["rayJobId"], st["checkpoint"]["step"]
        # The head dies while the new operator starts: it learns of the loss from KubeRay and
        # the head's Ray, not by having watched it happen.
        env.crash_operator()
        head = next(p for p in kubestack.get("pods", "-n", ns, "-l", "ray.io/node-type=head")["items"])
        kubelet.oom_kill(ns, head["metadata"]["name"], "ray-head")

        retried = wait_for("the lost attempt to be counted",
                           lambda: (lambda s: s if s.get("retries") or s.get("phase") in
                                    ("Succeeded", "Failed") else None)(status()),
                           timeout=300, interval=1)
        assert retried.get("retries") == 1 and retried["phase"] != "Failed", retried
        # The next attempt waits out the dead driver's lease: Retrying lasts long enough.
        assert retried["phase"] == "Retrying", retried
        env.crash_operator()
        assert cluster_uids() == uids
        second = retried["rayJobId"]
        # The second attempt's first own checkpoint, then its worker dies.
        st = wait_for("the second attempt's first checkpoint", lambda: (lambda s: s if (
            s.get("rayJobId") == second and s.get("checkpoint", {}).get("step", 0) > killed_after
            and s.get("phase") == "Running") or s.get("phase") in ("Succeeded", "Failed") or
            s.get("retries", 0) > 1 else None)(status()), timeout=600, interval=1)
        assert st["phase"] == "Running" and st["retries"] == 1, st
        assert cluster_uids() == uids
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
        # RayCluster, created once by the four operators together (their logs are one file;
        # cleanupPolicy DeleteCluster has removed it by now).
        log = env.operator.text()
        assert log.count(f"Created RayCluster {ns}/{name}") == 1, log[-3000:]
        assert [e["reason"] for e in events].count("ClusterCreating") == 1
        # No attempt submitted twice: a new operator finds its predecessor's submission in
        # the Ray head's Jobs API and does not submit it again. (An operator SIGKILLed right
        # after a submission never logs it: a line per attempt is at most one.)
        submitted = re.findall(rf"Submitted Ray job (\S+) for {ns}/{name}\b", log)
        assert len(submitted) == len(set(submitted)), submitted
        assert set(submitted) <= {first, second, st["rayJobId"]} and st["rayJobId"] in submitted, submitted
        # Each later attempt resumed from a checkpoint at least as late as the one complete
        # when the previous attempt's pod died, and trained on from there: no step before that
        # checkpoint was trained twice.
        run_prefix = f"{doc['spec']['checkpoint']['uri']}/{name}"[len(f"s3://{s3_server.bucket}/"):]
        attempts = metrics_attempts(s3_server, run_prefix)
        assert len(attempts) == 3, attempts
        for resumed, died_after in zip(attempts[1:], (killed_after, worker_killed_after)):
            assert resumed.resumed_from >= died_after > 0, (resumed.name, resumed.resumed_from, died_after)
            assert min(resumed.steps) == resumed.resumed_from + 1, (resumed.name, sorted(resumed.steps))
        assert max(attempts[2].steps) == 200
        assert env.operator.proc.poll() is None, env.operator.text()[-3000:]
    assert not env.forbidden(), env.forbidden()


def test_a_head_lost_in_every_attempt_fails_at_the_backoff_limit_keeping_the_last_log(
        kubestack, kubelet, s3_server, tiny_assets):
    name = "headloss"
    with operator_on_pods(kubestack, kubelet, "headloss") as env:
        ns = env.ns
        doc = env.job(name, s3_server, tiny_assets, {
            "training": {"maxSteps": 200, "epochs": 10},
            "checkpoint": {"everySteps": 10, "keep": 2},
            "runPolicy": {"backoffLimit": 1}})

        def status() -> dict:
            return kubestack.get("finetunejob", "-n", ns, name).get("status") or {}

        def running_with_checkpoint(sub_id: str | None, after: int) -> dict:
            return wait_for(f"attempt {sub_id or 1} with a checkpoint after step {after}",
                            lambda: (lambda s: s if (
                                s.get("phase") == "Running" and s.get("checkpoint", {}).get("step", 0) > after
                                and (sub_id is None or s.get("rayJobId") == sub_id))
                                or s.get("phase") in ("Succeeded", "Failed") else None)(status()),
                            timeout=900, interval=1)

        def kill_head() -> None:
            head = kubestack.get("pods", "-n", ns, "-l", "ray.io/node-type=head")["items"][0]
            kubelet.oom_kill(ns, head["metadata"]["name"], "ray-head")

        kubestack.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        st = running_with_checkpoint(None, 0)
        assert st["phase"] == "Running", st
        first, killed_after = st["rayJobId"], st["checkpoint"]["step"]
        kill_head()
        retried = wait_for("the lost attempt to be counted", lambda: (lambda s: s if s.get("retries")
                           or s.get("phase") in ("Succeeded", "Failed") else None)(status()),
                           timeout=300, interval=1)
        assert retried.get("retries") == 1 and retried["phase"] == "Retrying", retried
        second = retried["rayJobId"]
        st = running_with_checkpoint(second, killed_after)
        assert st["phase"] == "Running" and st["rayJobId"] == second, st
        kill_head()

        st = wait_for("the job to fail", lambda: (lambda s: s if s.get("phase") in
                      ("Succeeded", "Failed") else None)(status()), timeout=300, interval=1)
        assert st["phase"] == "Failed", st
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "BackoffLimitExceeded", failed
        assert "backoff limit (1)" in failed["message"] and second in failed["message"], failed
        # Exactly backoffLimit retries: no third attempt, before or after the failure.
        assert st["retries"] == 1 and st["rayJobId"] == second, st
        # The last attempt's log, as the operator last read it (its head forgot it): the tail
        # in status, the whole next to the checkpoints.
        assert st["logUri"].endswith(f"/{name}/logs/{second}.log"), st["logUri"]
        assert '"event"' in st["logTail"], st["logTail"]
        key = st["logUri"][len(f"s3://{s3_server.bucket}/"):]
        saved = s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read().decode()
        started = [e for e in parse_events(saved.splitlines()) if e["event"] == "started"]
        assert started and started[-1]["resumedFromStep"] >= killed_after, started
        events = kubestack.get("events", "-n", ns, "--field-selector",
                               f"involvedObject.name={name}")["items"]
        assert [e["reason"] for e in events].count("RayJobLost") == 1, [e["reason"] for e in events]
        assert [e["reason"] for e in events].count("BackoffLimitExceeded") == 1
        log = env.operator.text()
        assert sorted(re.findall(rf"Submitted Ray job (\S+) for {ns}/{name}\b", log)) == sorted([first, second])
        assert env.operator.proc.poll() is None, log[-3000:]
    assert not env.forbidden(), env.forbidden()
