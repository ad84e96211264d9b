"""Operator scale on the real control plane: `python -m bench operator_scale --stack real`.

operator_scale's method (N FineTuneJobs created at once; per round the floor, then ours, never
both at once; figures are medians over the rounds, ours/floor the median of the rounds' own
ratios) on the real kube-apiserver + etcd + controller-manager + scheduler + the real KubeRay
operator (finetune_testbed.kubestack) and a fake node pool (bench._real_stack). Each operator
authenticates as its own ServiceAccount with the chart's ClusterRole; its requests are counted
from the API server's audit log by its user (bench._audit).

No job reaches Running: no kubelet runs containers, so KubeRay's pods are bound to the fake
nodes and stay Pending, and every job stays Provisioning. What is measured instead, per run:
time until every RayCluster exists and every pod KubeRay makes for them is bound, per-job
create->RayCluster latency, the operator's API requests per job by verb from the burst until
the last pod is bound and the operator's writes have stopped for 2 s (its reactions to
KubeRay's status updates included), its CPU per job and peak RSS (VmHWM) over the same span,
and (at --track-at jobs, last round) what it does per job per minute while they all wait in
Provisioning.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import operator_scale as base
from bench._floor_operator import raycluster as floor_raycluster
from bench._real_stack import RealStack, env_for_ours
from bench.common import free_port, percentile, proc_cpu_seconds, proc_status_kb, table

WRITE_VERBS = base.WRITE_VERBS
PODS = "/api/v1/namespaces/{ns}/pods"
# Ours: a head and spec.resources.workers workers per job; the floor: a head and its one group.
OURS_PODS_PER_JOB = 1 + base.job_manifest("x", "x")["spec"]["resources"]["workers"]
FLOOR_PODS_PER_JOB = 1 + sum(g["replicas"] for g in floor_raycluster("x")["spec"]["workerGroupSpecs"])
PODS_PER_JOB = {"ours": OURS_PODS_PER_JOB, "floor": FLOOR_PODS_PER_JOB}

GOALS = {k: base.GOALS[k] for k in ("clusters_all_ratio", "p99_create_to_cluster_s",
                                    "writes_per_job", "peak_rss_mb")}

ROWS = [
    ("created all (s)", "created_all_s"),
    ("all RayClusters (s)", "clusters_all_s"),
    ("all pods bound (s)", "pods_bound_all_s"),
    ("create->cluster p50 (s)", "create_to_cluster_p50_s"),
    ("create->cluster p99 (s)", "create_to_cluster_p99_s"),
    ("API writes / job", "api_writes_per_job"),
    ("API reads / job", "api_reads_per_job"),
    ("operator CPU ms / job", "cpu_ms_per_job"),
    ("API server CPU ms / job", "apiserver_cpu_ms_per_job"),
    ("KubeRay CPU ms / job", "kuberay_cpu_ms_per_job"),
    ("operator peak RSS (MB)", "peak_rss_mb"),
]


class PodWatcher(base.Watcher):
    """operator_scale's watcher plus the namespace's pods: when each is first bound to a node."""

    def __init__(self, session: aiohttp.ClientSession, ns: str) -> None:
        super().__init__(session, ns)
        self.pod_bound: dict[str, float] = {}

    async def start(self) -> None:
        await super().start()
        path = PODS.format(ns=self.ns)
        async with self.session.get(path, params={"limit": "1"}) as resp:
            rv = (await resp.json())["metadata"]["resourceVersion"]
        self.tasks.append(asyncio.create_task(self._watch(path, rv, self._on_pod)))

    def _on_pod(self, kind: str, obj: dict, now: float) -> None:
        name = obj["metadata"]["name"]
        if obj["spec"].get("nodeName") and name not in self.pod_bound:
            self.pod_bound[name] = now
            self.changed.set()


async def run_one(which: str, n: int, args: argparse.Namespace, bed: RealStack, workdir: Path,
                  round_: int, track: bool) -> dict[str, Any]:
    ns = f"{which}-{n}-r{round_}"
    ident = bed.identities[which]
    pods_expected = PODS_PER_JOB[which] * n
    await bed.create_namespace(ns)
    live_port = free_port()
    env = {"HOME": str(workdir)}
    if which == "floor":
        argv = base.floor_argv(ns, live_port)
        env.update(KUBECONFIG=str(ident.kubeconfig), BENCH_KUBE_URL=bed.stack.server,
                   BENCH_KUBE_TOKEN=ident.token, BENCH_KUBE_CA=str(bed.stack.workdir / "ca.crt"))
    else:
        # The chart's settings (reconcile interval, logging, ...), one namespace (the floor
        # watches one too), free ports for a shared host.
        env.update(env_for_ours(bed.release, ident.kubeconfig))
        argv = base.ours_argv(["--namespace", ns, "--liveness-port", str(live_port),
                               "--metrics-port", "0"])
    pids = bed.component_pids()
    op = base.Child(argv, workdir / f"operator-{ns}.log", env, first_line=False)
    admin = bed.admin_session()
    try:
        base.wait_http_ok(f"http://127.0.0.1:{live_port}/healthz", 90, op)
        await asyncio.sleep(1.0)  # let the watch start before the burst; startup CPU excluded
        watcher = PodWatcher(admin, ns)
        await watcher.start()

        async def snapshot() -> dict[str, list]:
            return bed.audit.snapshot()
        rec0 = await snapshot()
        cpu0 = proc_cpu_seconds(op.pid)
        comp0 = {k: proc_cpu_seconds(p) for k, p in pids.items()}

        t0, t_created = await base.create_burst(admin, ns, n, args.create_concurrency)
        # KubeRay makes every cluster's pods at its own pace (one reconcile worker, 100 QPS):
        # well behind the clusters at 1,000 jobs.
        timeout = args.timeout or min(900.0, 120 + 0.5 * n)
        await base.wait_until(watcher, op, t0 + timeout, lambda: len(watcher.cluster_added) >= n
                              and len(watcher.pod_bound) >= pods_expected)
        t_end = time.monotonic()
        # The operator's reactions to KubeRay's last status updates are counted too.
        rec1 = await base.writes_settled(snapshot, which, quiet=2.0)
        cpu1 = proc_cpu_seconds(op.pid)
        comp1 = {k: proc_cpu_seconds(p) for k, p in pids.items()}
        hwm_kb = proc_status_kb(op.pid, "VmHWM")

        names = [base.job_name(i) for i in range(n)]
        c_lat = base.latencies(watcher.cluster_added, watcher.job_added, names)
        all_clusters = len(watcher.cluster_added) >= n
        all_bound = len(watcher.pod_bound) >= pods_expected
        calls = base.calls_by_verb(rec0, rec1, which)
        writes = sum(calls.get(v, 0) for v in WRITE_VERBS)
        reads = sum(calls.get(v, 0) for v in ("get", "list"))
        result: dict[str, Any] = {
            "operator": which, "jobs": n, "namespace": ns, "username": ident.username,
            "created_all_s": t_created,
            "clusters": len(watcher.cluster_added),
            "pods_bound": len(watcher.pod_bound), "pods_expected": pods_expected,
            # `running` for the report's timed-out row: no job runs here.
            "running": 0,
            "clusters_all_s": (max(watcher.cluster_added.values()) - t0) if all_clusters else None,
            "pods_bound_all_s": (max(watcher.pod_bound.values()) - t0) if all_bound else None,
            "timed_out_after_s": None if (all_clusters and all_bound) else t_end - t0,
            "create_to_cluster_p50_s": percentile(c_lat, 50),
            "create_to_cluster_p99_s": percentile(c_lat, 99),
            "api_calls_to_running": calls,
            "api_errors": bed.audit.error_counts()[which],
            "api_writes_per_job": writes / n,
            "api_reads_per_job": reads / n,
            "api_calls_per_job_by_verb": {k: v / n for k, v in calls.items() if " " not in k},
            "cpu_ms_per_job": (cpu1 - cpu0) * 1000 / n,
            "apiserver_cpu_ms_per_job": (comp1["kube-apiserver"] - comp0["kube-apiserver"]) * 1000 / n,
            "kuberay_cpu_ms_per_job": (comp1["kuberay-operator"] - comp0["kuberay-operator"]) * 1000 / n,
            "component_cpu_s": {k: comp1[k] - comp0[k] for k in comp0},
            "span_s": time.monotonic() - t0,
            "peak_rss_mb": hwm_kb / 1024 if hwm_kb else None,
            "watch_errors": watcher.errors, "watch_reconnects": watcher.reconnects,
            "operator_log": str(op.log_path),
        }
        base.write_timeline(workdir / f"timeline-{ns}.json", t0, names,
                            watcher.job_added, watcher.cluster_added)

        if track and all_clusters:
            # Every job waits in Provisioning (its pods Pending); whatever the operator does
            # now it does per job per interval for as long as they wait.
            await asyncio.sleep(args.settle)
            rec_a = await snapshot()
            c_a, w_a = proc_cpu_seconds(op.pid), time.monotonic()
            api_a = proc_cpu_seconds(pids["kube-apiserver"])
            await asyncio.sleep(args.track_seconds)
            c_b, w_b = proc_cpu_seconds(op.pid), time.monotonic()
            api_b = proc_cpu_seconds(pids["kube-apiserver"])
            rec_b = await snapshot()
            minutes = (w_b - w_a) / 60
            tcalls = base.calls_by_verb(rec_a, rec_b, which)
            result["waiting"] = {
                "jobs_provisioning": n, "seconds": w_b - w_a,
                "cpu_ms_per_minute": (c_b - c_a) * 1000 / minutes,
                "core_pct": (c_b - c_a) / (w_b - w_a) * 100,
                # The whole API server's (both operators' requests and the rest of the control
                # plane's), for the weight of the operator's reads there.
                "apiserver_core_pct": (api_b - api_a) / (w_b - w_a) * 100,
                "reads_per_job_per_minute": sum(tcalls.get(v, 0) for v in ("get", "list")) / n / minutes,
                "writes_per_job_per_minute": sum(tcalls.get(v, 0) for v in WRITE_VERBS) / n / minutes,
                "kube_calls_per_job_per_minute": {k: v / n / minutes for k, v in tcalls.items()},
            }
            result["peak_rss_mb"] = (proc_status_kb(op.pid, "VmHWM") or 0) / 1024
        await watcher.stop()
        return result
    finally:
        await admin.close()
        op.stop()


def run_size(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bed: RealStack = args._bed

    def run(which: str, round_: int) -> dict[str, Any]:
        last = round_ == args.rounds - 1
        return asyncio.run(run_one(which, n, args, bed, workdir, round_,
                                   track=last and n == args.track_at))

    def after(r: dict[str, Any]) -> None:
        r["namespace_deleted_s"] = asyncio.run(bed.delete_namespace(r["namespace"]))

    rounds = base.alternate(n, args, run, after, done="pods_bound")
    out = base.summarize(rounds, ROWS)
    out["stack"] = {"started_s": bed.started_s, "node_errors": bed.node_errors()[:20],
                    "kube_apiserver_peak_rss_mb": (proc_status_kb(
                        bed.component_pids()["kube-apiserver"], "VmHWM") or 0) / 1024}
    return out


def report(sizes: dict[int, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    parts, goals = [], {}
    for n, res in sizes.items():
        parts.extend(base.ratio_table(n, res, ROWS))
        parts.append(base.verb_table(n, res, "requests/job, burst to last pod bound"))
        for who in ("floor", "ours"):
            w = (res.get(who) or {}).get("waiting")
            if w:
                parts.append(table((f"{who}: {n} jobs waiting in Provisioning", "value"), [
                    ("seconds sampled", w["seconds"]),
                    ("CPU ms / minute", w["cpu_ms_per_minute"]),
                    ("% of one core", w["core_pct"]),
                    ("kube-apiserver, % of one core", w["apiserver_core_pct"]),
                    ("API reads / job / min", w["reads_per_job_per_minute"]),
                    ("API writes / job / min", w["writes_per_job_per_minute"]),
                    *((f"{k} /job/min", v) for k, v in w["kube_calls_per_job_per_minute"].items()
                      if " " in k),
                ]))
        if res.get("ours"):
            goals[str(n)] = base.cluster_goals(res, "to last pod bound")
    parts.append(base.goal_table(goals))
    parts.append("No job reaches Running on this stack (no kubelet runs containers: pods are "
                 "bound and stay Pending).")
    return "\n\n".join(parts), goals


def main(args: argparse.Namespace, argv: list[str]) -> int:
    args.jobs = args.jobs or "100,1000"
    args.settle = 15.0 if args.settle is None else args.settle
    args.results_name = args.results_name or "operator_scale_real"
    if args.ours_pythonpath:
        raise SystemExit("--ours-pythonpath is for the emulator run")
    sizes = [int(x) for x in args.jobs.split(",") if x.strip()]
    print("starting the control plane, KubeRay and the node pool ...", flush=True)
    args._bed = RealStack(max(sizes), OURS_PODS_PER_JOB - 1, FLOOR_PODS_PER_JOB)
    print(f"  ready in {args._bed.started_s:.1f} s; API server {args._bed.stack.server}", flush=True)
    try:
        return base.run_and_report(args, argv, "bench-operator-scale-real-", run_size, report,
                                   ROWS, GOALS)
    finally:
        args._bed.stop()
