"""Operator scale: N FineTuneJobs created at once, the project's operator against a bare kopf floor.

Processes (each its own, so no one's CPU or GIL hides inside another's figures):
- the test bed's Kubernetes API emulator (`bench._emulator`, which also serves the emulator's
  request recorder at /debug/recorder);
- the cluster side (`bench._fake_ray`): the test bed's KubeRay stand-in marking RayClusters ready,
  and a light Ray Jobs HTTP API answering RUNNING with one progress line in the log;
- the operator under test: the floor (`kopf run bench/_floor_operator.py`: one create handler,
  one RayCluster, one status.phase patch) or ours (`finetune operator`, default settings);
- this driver: creates the jobs and timestamps what a watcher sees.

Per size N, on one emulator, --rounds rounds (default 3); in each, the floor runs first in namespace
floor-N-rR, then ours in ours-N-rR (each namespace is deleted after its run, and only one operator
runs at a time). Each figure is the median over the rounds, and ours/floor the median of the
rounds' own ratios (the noise of a shared machine moves the tail of a burst by seconds). Figures:
time until every RayCluster exists / every job is Running (floor: its phase patch), per-job
create->cluster and create->running latency (from the driver's watch events), API requests per job
by verb up to Running and until the operator's writes stop (Events are posted in the background;
the emulator's recorder), operator peak RSS (VmHWM) and CPU per job over the same span
(utime+stime from /proc), and at --track-at jobs the operator's CPU per minute while all sit in
Running (in the last round). Ours is reported as a ratio to the floor measured in the same round.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from bench.common import (REPO, VENV_BIN, fmt, free_port, percentile, proc_cpu_seconds,
                          proc_status_kb, ratio, table, write_results)

WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
FTJ = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"
RAYCLUSTERS = "/apis/ray.io/v1/namespaces/{ns}/rayclusters"

GOALS = {
    "running_all_s": 15.0,          # 1,000 jobs all Running within 15 s
    "clusters_all_ratio": 2.0,      # all RayClusters within 2x the floor's time
    "p99_create_to_cluster_s": 3.0,
    "writes_per_job": 8.0,          # API writes per job up to Running
    "peak_rss_mb": 150.0,
    "tracking_core_pct": 10.0,      # % of one core while 1,000 jobs sit in Running
}


def job_manifest(name: str, namespace: str) -> dict[str, Any]:
    """A valid job the operator accepts; no spec.s3.secretRef, so no Secret is needed."""
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/tiny"},
            "dataset": {"uri": "s3://data/train.jsonl", "maxSeqLength": 64},
            "strategy": {"type": "deepspeed", "deepspeed": {"stage": 3}},
            "training": {"maxSteps": 1000, "microBatchSize": 4, "learningRate": 3.0e-4,
                         "precision": "bf16"},
            "resources": {"workers": 2, "gpusPerWorker": 1, "cpusPerWorker": 4,
                          "memoryPerWorker": "32Gi"},
            "checkpoint": {"uri": f"s3://ckpt/{namespace}", "everySteps": 100, "keep": 2},
        },
    }


# --- child processes ---------------------------------------------------------------------------

class Child:
    """A child process whose first stdout line is a JSON object (its address)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 first_line: bool = True) -> None:
        self.log_path = log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {})},
                                     stdout=subprocess.PIPE if first_line else self.log,
                                     stderr=self.log, start_new_session=True)
        self.info: dict[str, Any] = {}
        if first_line:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(5)
                raise RuntimeError(f"{argv[:4]} exited: see {log}")
            self.info = json.loads(line)
            # The rest of stdout goes to the log, drained by a thread-free copy at exit.

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            rest = self.proc.stdout.read()
            if rest:
                self.log.write(rest)
        self.log.close()


def wait_http_ok(url: str, timeout: float, proc: Child) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"the operator exited ({proc.proc.returncode}); see {proc.log_path}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout}s; see {proc.log_path}")


def write_kubeconfig(path: Path, url: str, token: str, namespace: str) -> Path:
    from finetune_testbed.emulator import write_kubeconfig as write
    return write(path, url, token, namespace)


# --- the driver's view ---------------------------------------------------------------------------

class Watcher:
    """Timestamps (monotonic, this process) of what a client watching the namespace sees."""

    def __init__(self, session: aiohttp.ClientSession, ns: str) -> None:
        self.session, self.ns = session, ns
        self.job_added: dict[str, float] = {}
        self.job_running: dict[str, float] = {}
        self.cluster_added: dict[str, float] = {}
        self.tasks: list[asyncio.Task] = []
        self.errors: list[str] = []
        self.reconnects = 0
        self.changed = asyncio.Event()

    async def start(self) -> None:
        for path, handler in ((FTJ.format(ns=self.ns), self._on_job),
                              (RAYCLUSTERS.format(ns=self.ns), self._on_cluster)):
            async with self.session.get(path) as resp:
                rv = (await resp.json())["metadata"]["resourceVersion"]
            self.tasks.append(asyncio.create_task(self._watch(path, rv, handler)))

    async def _watch(self, path: str, rv: str, handler) -> None:
        """Events from `rv` on, resumed where they stopped when the server ends the watch (a
        real API server closes a watcher that falls behind a burst, and every watch after a
        timeout); relisted after 410 Gone. Each resumption is noted in `reconnects`."""
        while True:
            params = {"watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true"}
            try:
                async with self.session.get(path, params=params,
                                            timeout=aiohttp.ClientTimeout(total=None)) as resp:
                    async for line in resp.content:
                        now = time.monotonic()
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            if obj.get("code") != 410:
                                self.errors.append(str(obj))
                                return
                            rv = await self._relist(path, handler)
                            break
                        rv = obj["metadata"].get("resourceVersion") or rv
                        if event["type"] in ("ADDED", "MODIFIED"):
                            handler(event["type"], obj, now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken watch is a bench failure; say it
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            self.reconnects += 1

    async def _relist(self, path: str, handler) -> str:
        async with self.session.get(path) as resp:
            body = await resp.json()
        now = time.monotonic()
        for obj in body.get("items") or []:
            handler("ADDED", obj, now)
        return body["metadata"]["resourceVersion"]

    def _on_job(self, kind: str, obj: dict, now: float) -> None:
        name = obj["metadata"]["name"]
        self.job_added.setdefault(name, now)
        if (obj.get("status") or {}).get("phase") == "Running" and name not in self.job_running:
            self.job_running[name] = now
            self.changed.set()

    def _on_cluster(self, kind: str, obj: dict, now: float) -> None:
        owners = obj["metadata"].get("ownerReferences") or []
        job = owners[0]["name"] if owners else obj["metadata"]["name"]
        if job not in self.cluster_added:
            self.cluster_added[job] = now
            self.changed.set()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def recorder(session: aiohttp.ClientSession) -> dict[str, list]:
    async with session.get("/debug/recorder") as resp:
        return await resp.json()


async def writes_settled(snapshot: Callable[[], Awaitable[dict[str, list]]], identity: str,
                         quiet: float = 1.0, limit: float = 30.0) -> dict[str, list]:
    """The request counts (`snapshot()`: the emulator's recorder, or an audit log read the same
    way) once `identity` has made no write for `quiet` seconds (`limit` at most)."""
    def writes(snap: dict[str, list]) -> int:
        return sum(row[5] for row in snap.get(identity, []) if row[0] in WRITE_VERBS)
    deadline = time.monotonic() + limit
    snap = await snapshot()
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        again = await snapshot()
        if writes(again) == writes(snap):
            return again
        snap = again
    return snap


def calls_by_verb(before: dict[str, list], after: dict[str, list], identity: str) -> dict[str, int]:
    """Requests of `identity` between two recorder snapshots, by verb (and 'verb resource')."""
    def index(snap: dict[str, list]) -> dict[tuple, int]:
        return {tuple(row[:5]): row[5] for row in snap.get(identity, [])}
    b, a = index(before), index(after)
    out: dict[str, int] = {}
    for key, n in a.items():
        delta = n - b.get(key, 0)
        if delta <= 0:
            continue
        verb, group, resource, sub, _ns = key
        out[verb] = out.get(verb, 0) + delta
        name = f"{verb} {resource}{'/' + sub if sub else ''}"
        out[name] = out.get(name, 0) + delta
    return out


async def fake_ray_stats(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/stats") as resp:
            return await resp.json()


# --- shared by both control planes (the emulator here, the real one in operator_scale_real) -----

def floor_argv(ns: str, live_port: int) -> list[str]:
    # `python -m kopf`: the kopf of this interpreter (a worktree's venv may have no kopf script).
    return [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", ns,
            "--liveness", f"http://127.0.0.1:{live_port}/healthz",
            str(REPO / "bench" / "_floor_operator.py")]


def ours_argv(flags: list[str]) -> list[str]:
    """`finetune operator FLAGS` of this interpreter's venv (VENV_BIN: a worktree's own)."""
    if os.environ.get("BENCH_PROFILE"):
        # Where the CPU goes (not for the reported figures: the profiler slows it down).
        return [sys.executable, "-m", "cProfile", "-o", os.environ["BENCH_PROFILE"],
                "-m", "finetune_cli", "operator", *flags]
    return [str(VENV_BIN / "finetune"), "operator", *flags]


async def create_burst(session: aiohttp.ClientSession, ns: str, n: int,
                       concurrency: int) -> tuple[float, float]:
    """Every job created as fast as the API server takes them: (start, seconds taken)."""
    sem = asyncio.Semaphore(concurrency)
    failures: list[str] = []

    async def create(i: int) -> None:
        async with sem:
            async with session.post(FTJ.format(ns=ns), json=job_manifest(job_name(i), ns)) as r:
                if r.status != 201:
                    failures.append(f"{r.status}: {(await r.text())[:200]}")

    t0 = time.monotonic()
    await asyncio.gather(*(create(i) for i in range(n)))
    t_created = time.monotonic() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} creates failed, e.g. {failures[0]}")
    return t0, t_created


async def wait_until(watcher: Watcher, op: Child, deadline: float,
                     done: Callable[[], bool]) -> None:
    """Until `done()` (checked at each change the watcher sees) or the deadline; an operator
    that exits meanwhile fails the run."""
    while time.monotonic() < deadline and not done():
        if op.proc.poll() is not None:
            raise RuntimeError(f"the operator exited; see {op.log_path}")
        watcher.changed.clear()
        try:
            await asyncio.wait_for(watcher.changed.wait(), 1.0)
        except TimeoutError:
            pass


def job_name(i: int) -> str:
    return f"job-{i:05d}"


def latencies(later: dict[str, float], added: dict[str, float], names: list[str]) -> list[float]:
    return [later[j] - added[j] for j in names if j in later and j in added]


def write_timeline(path: Path, t0: float, names: list[str], *marks: dict[str, float]) -> None:
    """Per-job timeline (seconds after the burst began), for looking at the tail."""
    path.write_text(json.dumps({name: [round(d[name] - t0, 4) if name in d else None
                                       for d in marks] for name in names}))


def alternate(n: int, args: argparse.Namespace,
              run: Callable[[str, int], dict[str, Any]],
              after: Callable[[dict[str, Any]], None],
              done: str = "running") -> dict[str, list[dict[str, Any]]]:
    """`run(which, round)` for each round, the operators in turn, `after(result)` between
    them (the namespace's deletion); `done`: the result's count printed beside the clusters'
    (`done` and `done_all_s`)."""
    rounds: dict[str, list[dict[str, Any]]] = {which: [] for which in args.operators}
    try:
        for round_ in range(args.rounds):
            # Floor and ours take turns, each round on the same control plane: the machine's
            # noise of the moment hits both, and the ratio is taken within a round.
            for which in args.operators:
                print(f"  N={n} round {round_ + 1}/{args.rounds}: {which} ...", flush=True)
                r = run(which, round_)
                rounds[which].append(r)
                print(f"  N={n} round {round_ + 1}/{args.rounds}: {which}: clusters "
                      f"{r['clusters']}/{n} in {fmt(r['clusters_all_s'])} s, {done} {r[done]} in "
                      f"{fmt(r[done + '_all_s'])} s", flush=True)
                after(r)
    except KeyboardInterrupt:
        # Ctrl-C (a run that outlasts its time): report the rounds both operators finished.
        complete = min(len(v) for v in rounds.values())
        if not complete:
            raise
        print(f"  N={n}: interrupted; reporting the {complete} complete round(s)", flush=True)
        args._interrupted = True
        rounds = {which: runs[:complete] for which, runs in rounds.items()}
    return rounds


def summarize(rounds: dict[str, list[dict[str, Any]]], rows: list[tuple[str, str]]) -> dict[str, Any]:
    """Per operator the median of its rounds; the rounds' own ours/floor ratios."""
    out: dict[str, Any] = {which: median_run(runs, rows) for which, runs in rounds.items()}
    if "floor" in rounds and "ours" in rounds:
        out["round_ratios"] = {key: [ratio(o.get(key), f.get(key))
                                     for f, o in zip(rounds["floor"], rounds["ours"])]
                               for _, key in rows}
    return out


def ratio_table(n: int, res: dict[str, Any], rows: list[tuple[str, str]]) -> list[str]:
    """The floor | ours | ours/floor table of one size, and the cluster time's round ratios."""
    floor, ours = res.get("floor"), res.get("ours")
    round_ratios = res.get("round_ratios") or {}
    out = []
    for label, key in rows:
        f = floor.get(key) if floor else None
        o = ours.get(key) if ours else None
        # The median of the rounds' own ratios (each floor and ours minutes apart).
        out.append((label, f, o, median(round_ratios[key]) if key in round_ratios else ratio(o, f)))
    for who in ("floor", "ours"):
        r = res.get(who)
        if r and r.get("timed_out_after_s"):
            out.append((f"{who}: TIMED OUT at", r["timed_out_after_s"],
                        f"{r['clusters']} clusters", f"{r['running']} running"))
    rounds = len((ours or floor or {}).get("rounds") or [None])
    parts = [table((f"N={n}, median of {rounds}", "floor", "ours", "ours/floor"), out)]
    if round_ratios.get("clusters_all_s") and rounds > 1:
        parts.append("all RayClusters, ours/floor by round: " + ", ".join(
            fmt(v) for v in round_ratios["clusters_all_s"]))
    return parts


def verb_table(n: int, res: dict[str, Any], title: str) -> str:
    verbs = sorted({k for who in ("floor", "ours") if res.get(who)
                    for k in res[who]["api_calls_to_running"]})
    return table((title, "floor", "ours"),
                 [(v, *((res[who]["api_calls_to_running"].get(v, 0) / n) if res.get(who) else None
                        for who in ("floor", "ours")))
                  for v in verbs])


# --- one operator, one size ----------------------------------------------------------------------

async def run_one(which: str, n: int, args: argparse.Namespace, emu_url: str, tokens: dict[str, str],
                  fake_ray: Child, workdir: Path, round_: int, track: bool) -> dict[str, Any]:
    ns = f"{which}-{n}-r{round_}"
    identity = which
    admin = aiohttp.ClientSession(emu_url, headers={"Authorization": f"Bearer {tokens['admin']}"},
                                  connector=aiohttp.TCPConnector(limit=0))
    try:
        async with admin.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": ns}}) as resp:
            assert resp.status == 201, await resp.text()
        kubeconfig = write_kubeconfig(workdir / f"kubeconfig-{ns}", emu_url, tokens[identity], ns)
        live_port = free_port()
        env = {"KUBECONFIG": str(kubeconfig), "HOME": str(workdir)}
        if which == "floor":
            argv = floor_argv(ns, live_port)
            env.update(BENCH_KUBE_URL=emu_url, BENCH_KUBE_TOKEN=tokens[identity])
        else:
            # Default settings (reconcile interval, timeouts, logging) but ports for a shared host
            # and the head address the stand-in publishes.
            if args.ours_pythonpath:
                # A candidate fix of the operator, measured without touching operator/.
                env["PYTHONPATH"] = os.pathsep.join((args.ours_pythonpath, str(REPO)))
            flags = ["--namespace", ns, "--liveness-port", str(live_port), "--metrics-port", "0",
                     "--dashboard-host", "127.0.0.1"]
            argv = ours_argv(flags)
        op = Child(argv, workdir / f"operator-{ns}.log", env, first_line=False)
        try:
            wait_http_ok(f"http://127.0.0.1:{live_port}/healthz", 60, op)
            await asyncio.sleep(1.0)  # let the watch start before the burst; startup CPU excluded
            watcher = Watcher(admin, ns)
            await watcher.start()
            rec0 = await recorder(admin)
            ray0 = await fake_ray_stats(fake_ray.info["dashboard_port"])
            cpu0 = proc_cpu_seconds(op.pid)
            emu_cpu0 = proc_cpu_seconds(args._emu_pid)

            t0, t_created = await create_burst(admin, ns, n, args.create_concurrency)

            # Long enough for the floor many times over; capped so a slow operator at 3,000 jobs
            # reports how far it got (clusters/running counts) instead of holding the run.
            timeout = args.timeout or min(240.0, 60 + 0.15 * n)
            await wait_until(watcher, op, t0 + timeout,
                             lambda: len(watcher.cluster_added) >= n and len(watcher.job_running) >= n)
            t_end = time.monotonic()
            # What the operator still does for the burst once the last job is Running (its
            # Events, posted in the background) is counted too: requests and CPU are read
            # when its writes have stopped.
            rec1 = await writes_settled(lambda: recorder(admin), identity)
            cpu1 = proc_cpu_seconds(op.pid)
            emu_cpu1 = proc_cpu_seconds(args._emu_pid)
            ray1 = await fake_ray_stats(fake_ray.info["dashboard_port"])
            hwm_kb = proc_status_kb(op.pid, "VmHWM")

            names = [job_name(i) for i in range(n)]
            c_lat = latencies(watcher.cluster_added, watcher.job_added, names)
            r_lat = latencies(watcher.job_running, watcher.job_added, names)
            all_clusters = len(watcher.cluster_added) >= n
            all_running = len(watcher.job_running) >= n
            calls = calls_by_verb(rec0, rec1, identity)
            writes = sum(calls.get(v, 0) for v in WRITE_VERBS)
            reads = sum(calls.get(v, 0) for v in ("get", "list"))
            result: dict[str, Any] = {
                "operator": which, "jobs": n, "namespace": ns,
                "created_all_s": t_created,
                "clusters": len(watcher.cluster_added), "running": len(watcher.job_running),
                "clusters_all_s": (max(watcher.cluster_added.values()) - t0) if all_clusters else None,
                "running_all_s": (max(watcher.job_running.values()) - t0) if all_running else None,
                "timed_out_after_s": None if (all_clusters and all_running) else t_end - t0,
                "create_to_cluster_p50_s": percentile(c_lat, 50),
                "create_to_cluster_p99_s": percentile(c_lat, 99),
                "create_to_running_p50_s": percentile(r_lat, 50),
                "create_to_running_p99_s": percentile(r_lat, 99),
                "api_calls_to_running": calls,
                "api_writes_per_job": writes / n,
                "api_reads_per_job": reads / n,
                "api_calls_per_job_by_verb": {k: v / n for k, v in calls.items() if " " not in k},
                "ray_api_calls": {k: v - ray0["requests"].get(k, 0) for k, v in ray1["requests"].items()},
                "cpu_ms_per_job": (cpu1 - cpu0) * 1000 / n,
                "emulator_cpu_ms_per_job": (emu_cpu1 - emu_cpu0) * 1000 / n,
                "peak_rss_mb": hwm_kb / 1024 if hwm_kb else None,
                "watch_errors": watcher.errors, "watch_reconnects": watcher.reconnects,
                "operator_log": str(op.log_path),
            }

            write_timeline(workdir / f"timeline-{ns}.json", t0, names,
                           watcher.job_added, watcher.cluster_added, watcher.job_running)

            if track and all_running:
                # The tracking cost: every job Running, nothing changing; whatever the operator
                # does now it does per job per interval, forever.
                await asyncio.sleep(args.settle)
                rec_a = await recorder(admin)
                ray_a = await fake_ray_stats(fake_ray.info["dashboard_port"])
                c_a, w_a = proc_cpu_seconds(op.pid), time.monotonic()
                await asyncio.sleep(args.track_seconds)
                c_b, w_b = proc_cpu_seconds(op.pid), time.monotonic()
                rec_b = await recorder(admin)
                ray_b = await fake_ray_stats(fake_ray.info["dashboard_port"])
                minutes = (w_b - w_a) / 60
                tcalls = calls_by_verb(rec_a, rec_b, identity)
                result["tracking"] = {
                    "jobs_running": n, "seconds": w_b - w_a,
                    "cpu_ms_per_minute": (c_b - c_a) * 1000 / minutes,
                    "core_pct": (c_b - c_a) / (w_b - w_a) * 100,
                    "kube_calls_per_job_per_minute": {k: v / n / minutes for k, v in tcalls.items()},
                    "ray_calls_per_job_per_minute": {
                        k: (v - ray_a["requests"].get(k, 0)) / n / minutes
                        for k, v in ray_b["requests"].items()},
                }
                result["peak_rss_mb"] = (proc_status_kb(op.pid, "VmHWM") or 0) / 1024
            await watcher.stop()
            return result
        finally:
            op.stop()
    finally:
        await admin.close()


async def delete_namespace(emu_url: str, token: str, ns: str) -> None:
    async with aiohttp.ClientSession(emu_url, headers={"Authorization": f"Bearer {token}"}) as s:
        async with s.delete(f"/api/v1/namespaces/{ns}") as resp:
            await resp.read()


def run_size(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    tokens = {name: f"{name}-{secrets.token_hex(8)}" for name in ("admin", "floor", "ours", "kuberay-operator")}
    emu = Child([sys.executable, "-m", "bench._emulator",
                 *(f"--token={k}={v}" for k, v in tokens.items())], workdir / f"emulator-{n}.log")
    fake = None
    try:
        args._emu_pid = emu.pid
        fake = Child([sys.executable, "-m", "bench._fake_ray", "--kube-url", emu.info["url"],
                      "--token", tokens["kuberay-operator"], "--ready-delay", str(args.ready_delay)],
                     workdir / f"fake-ray-{n}.log")
        def run(which: str, round_: int) -> dict[str, Any]:
            last = round_ == args.rounds - 1
            return asyncio.run(run_one(which, n, args, emu.info["url"], tokens, fake, workdir,
                                       round_, track=last and n == args.track_at))

        rounds = alternate(n, args, run, lambda r: asyncio.run(
            delete_namespace(emu.info["url"], tokens["admin"], r["namespace"])))
        out = summarize(rounds, ROWS)
        out["emulator_peak_rss_mb"] = (proc_status_kb(emu.pid, "VmHWM") or 0) / 1024
        return out
    finally:
        if fake is not None:
            fake.stop()
        emu.stop()


def median_run(runs: list[dict[str, Any]], rows: list[tuple[str, str]]) -> dict[str, Any]:
    """The last round's record with every figure of the table replaced by its median over
    the rounds (a round that timed out counts as slower than any that finished); the rounds
    themselves are kept under `rounds`."""
    out = dict(runs[-1])
    for _, key in rows:
        middle = percentile([math.inf if r.get(key) is None else r[key] for r in runs], 50)
        out[key] = None if middle == math.inf else middle
    out["rounds"] = [{key: r.get(key) for _, key in rows} for r in runs]
    return out


def median(values: list[float | None]) -> float | None:
    """Nearest-rank median of the figures there are (a round without one is left out)."""
    return percentile([v for v in values if v is not None], 50)


# --- report ----------------------------------------------------------------------------------------

ROWS = [
    ("created all (s)", "created_all_s"),
    ("all RayClusters (s)", "clusters_all_s"),
    ("all Running (s)", "running_all_s"),
    ("create->cluster p50 (s)", "create_to_cluster_p50_s"),
    ("create->cluster p99 (s)", "create_to_cluster_p99_s"),
    ("create->running p50 (s)", "create_to_running_p50_s"),
    ("create->running p99 (s)", "create_to_running_p99_s"),
    ("API writes / job", "api_writes_per_job"),
    ("API reads / job", "api_reads_per_job"),
    ("operator CPU ms / job", "cpu_ms_per_job"),
    ("emulator CPU ms / job", "emulator_cpu_ms_per_job"),
    ("operator peak RSS (MB)", "peak_rss_mb"),
]


def cluster_goals(res: dict[str, Any], writes_span: str) -> dict[str, bool]:
    """The goals both control planes share: clusters within 2x the floor, p99, writes, RSS."""
    ours, g = res["ours"], {}
    cluster_ratio = median((res.get("round_ratios") or {}).get("clusters_all_s") or [])
    if res.get("floor") and cluster_ratio is not None:
        g["all RayClusters within 2x floor"] = cluster_ratio <= GOALS["clusters_all_ratio"]
    if ours["create_to_cluster_p99_s"] is not None:
        g["p99 create->cluster < 3 s"] = ours["create_to_cluster_p99_s"] < GOALS["p99_create_to_cluster_s"]
    g[f"<= 8 API writes/job {writes_span}"] = ours["api_writes_per_job"] <= GOALS["writes_per_job"]
    g["peak RSS < 150 MB"] = (ours["peak_rss_mb"] or 0) < GOALS["peak_rss_mb"]
    return g


def goal_table(goals: dict[str, dict[str, bool]]) -> str:
    return table(("N", "goal", "verdict"), [(n, k, "met" if v else "NOT met")
                                            for n, g in goals.items() for k, v in g.items()])


def report(sizes: dict[int, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    parts, goals = [], {}
    for n, res in sizes.items():
        floor, ours = res.get("floor"), res.get("ours")
        round_ratios = res.get("round_ratios") or {}
        parts.extend(ratio_table(n, res, ROWS))
        parts.append(verb_table(n, res, "requests/job to Running"))
        for who in ("floor", "ours"):
            t = (res.get(who) or {}).get("tracking")
            if t:
                parts.append(table((f"{who}: tracking {n} Running jobs", "value"), [
                    ("seconds sampled", t["seconds"]),
                    ("CPU ms / minute", t["cpu_ms_per_minute"]),
                    ("% of one core", t["core_pct"]),
                    *((f"k8s {k} /job/min", v) for k, v in t["kube_calls_per_job_per_minute"].items() if " " in k),
                    *((f"ray {k} /job/min", v) for k, v in t["ray_calls_per_job_per_minute"].items()),
                ]))
        if ours:
            g = goals.setdefault(str(n), {})
            if n == 1000 or n == max(sizes):
                g["all Running within 15 s (1,000 jobs)"] = (ours["running_all_s"] is not None
                                                             and ours["running_all_s"] <= GOALS["running_all_s"]) if n == 1000 else None
            g.update(cluster_goals(res, "to Running"))
            if ours.get("tracking"):
                g["tracking 1,000 Running < 10% of a core"] = ours["tracking"]["core_pct"] < GOALS["tracking_core_pct"]
            g = {k: v for k, v in g.items() if v is not None}
            goals[str(n)] = g
    parts.append(goal_table(goals))
    return "\n\n".join(parts), goals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench operator_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", choices=("emulator", "real"), default="emulator",
                   help="the API emulator and a KubeRay stand-in (default), or the real control "
                        "plane with the real KubeRay and a fake node pool (operator_scale_real)")
    p.add_argument("--jobs", default="", help="comma-separated sizes (default 100,1000,3000; "
                                               "with --stack real 100,1000)")
    p.add_argument("--operators", default="floor,ours", help="which to run, in order (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per size, floor and ours in turn; medians are reported (default %(default)s)")
    p.add_argument("--track-at", type=int, default=1000,
                   help="the size at which to sample the tracking cost (with --stack real: the "
                        "cost of the jobs waiting in Provisioning) (default %(default)s)")
    p.add_argument("--track-seconds", type=float, default=30.0)
    # Past the operator's tracking interval (30 s): each Running job's first look at its
    # log writes status.progress once; the sample is of the steady state after that.
    p.add_argument("--settle", type=float, default=None,
                   help="seconds after the last job is Running (real: after the last pod is "
                        "bound) before tracking is sampled (default 35; real 15)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="per run; 0 = 60 s + 150 ms per job, at most 240 s (real: 120 s + "
                        "0.5 s per job, at most 900 s)")
    p.add_argument("--create-concurrency", type=int, default=32)
    p.add_argument("--ready-delay", type=float, default=0.2,
                   help="the KubeRay stand-in's provisioning delay (its default)")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (path printed)")
    p.add_argument("--ours-pythonpath", default="",
                   help="a directory with a modified finetune_operator package to measure instead "
                        "of operator/ (e.g. a candidate fix)")
    p.add_argument("--results-name", default="",
                   help="results file name under bench/results/ (default operator_scale; with "
                        "--stack real operator_scale_real)")
    return p


def run_and_report(args: argparse.Namespace, argv: list[str], prefix: str,
                   run_size: Callable[[int, argparse.Namespace, Path], dict[str, Any]],
                   report: Callable[[dict[int, dict[str, Any]]], tuple[str, dict[str, Any]]],
                   rows: list[tuple[str, str]], goals: dict[str, float]) -> int:
    """Each size in turn; the report and the results file of the sizes done, even when a
    later size fails."""
    args.operators = [o.strip() for o in args.operators.split(",") if o.strip()]
    sizes = [int(x) for x in args.jobs.split(",") if x.strip()]
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"operator_scale ({args.stack}): sizes {sizes}; logs in {workdir}", flush=True)
    results: dict[int, dict[str, Any]] = {}
    try:
        for n in sizes:
            results[n] = run_size(n, args, workdir)
            if getattr(args, "_interrupted", False):
                break
    finally:
        if results:
            text, verdicts = report(results)
            print(text)
            ratios = {str(n): {key: median((r.get("round_ratios") or {}).get(key) or [])
                               for _, key in rows} for n, r in results.items()}
            path = write_results(args.results_name, {
                "goals": goals, "verdicts": verdicts, "ratios_ours_over_floor": ratios,
                "table": text, "sizes": {str(n): r for n, r in results.items()},
                "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            }, ["python", "-m", "bench", "operator_scale", *argv])
            print(f"results: {path}")
        if not args.keep_logs and results:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.stack == "real":
        from bench import operator_scale_real
        return operator_scale_real.main(args, argv)
    args.jobs = args.jobs or "100,1000,3000"
    args.settle = 35.0 if args.settle is None else args.settle
    args.results_name = args.results_name or "operator_scale"
    return run_and_report(args, argv, "bench-operator-scale-", run_size, report, ROWS, GOALS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
