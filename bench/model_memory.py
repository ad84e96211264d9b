"""Host memory per rank of loading and training a model: today's full load against sharded
loading (FSDP2 on the meta device, ZeRO-3 under zero.Init), in the same run.

"Today's path" is the trainer of a baseline commit (default BASELINE_REV, the last commit before
sharded loading), checked out by this benchmark into a temporary `git worktree` and run with its
own `trainer_image/` and `api/` first on PYTHONPATH: the code exactly as it was, not a switch
kept in the new code (a switch would measure the new code's other changes too: bucket sizes,
the final-model writer, the load dtype). The new path is this checkout.

Every run is one `finetune-train --job FILE --fresh` that starts its own Ray (so its worker
processes inherit that PYTHONPATH), 2 CPU workers, fp32, a Llama-style model built from a config
(cached in .cache/bench-assets/), `--steps` optimizer steps, one checkpoint at the last step and
the final model. bench/_hooks/sitecustomize.py (BENCH_MEMORY=1) records each training process's
peak RSS (VmHWM) from outside the trainer: when setup ends (the **load** phase: data, model,
sharding; until training starts) and when the run ends (the **run** phase: the steps, the
checkpoint, the final model). The same runs with a tiny model (hidden 64, 2 layers) give the
fixed share of each phase (Python, torch, Ray, DeepSpeed) for that path and strategy; ratios are
over what is left:

- load: (peak − tiny's) ÷ (model bytes ÷ world): a whole copy per rank is ≥ world; goal ≤ 1.3;
- run: (peak − tiny's) ÷ the state a rank must hold, which for ZeRO is the ZeRO paper's per-rank
  figure in fp32 (stage 1: 8Ψ + 8Ψ/N bytes for Ψ parameters on N ranks; stage 2: 4Ψ + 12Ψ/N;
  stage 3 and FSDP FULL_SHARD: 16Ψ/N); goal ≤ 1.3 at every stage;
- tokens/s: steady state, from the end of step 1 to the end of the last step (progress events);
  new ÷ today ≥ 0.95.

Today's path is only run up to --baseline-max-params (default 300M): above that it needs more
than this 2-core 24 GiB machine can give two ranks (the issue saw ~570M killed for memory). Any
run whose expected need (needed_bytes) exceeds 85 % of the memory available when it would start
is skipped and says so: a run killed for memory here would take other processes with it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, table, write_results
from bench.trainer_overhead import HOOKS, base_env, build_assets, run_trainer

BASELINE_REV = "8438fd0"  # main before sharded loading and FSDP2
# name -> (hidden, layers, heads, intermediate, vocab)
SIZES = {"tiny": (64, 2, 4, 128, 32000), "125M": (768, 12, 12, 2048, 32000), "500M": (1280, 20, 20, 3456, 32000),
         "1B": (2048, 16, 16, 5504, 32000)}
STRATEGIES = {"zero1": {"type": "deepspeed", "deepspeed": {"stage": 1}},
              "zero2": {"type": "deepspeed", "deepspeed": {"stage": 2}},
              "zero3": {"type": "deepspeed", "deepspeed": {"stage": 3}},
              "fsdp": {"type": "fsdp", "fsdp": {"shardingStrategy": "FULL_SHARD"}}}
NAMES = {"zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP FULL_SHARD"}


def paper_state_bytes(strategy: str, params: int, world: int) -> float:
    """The ZeRO paper's per-rank model state in fp32 (weights 4Ψ, gradients 4Ψ, Adam's two
    moments 8Ψ; no separate master copy): what each stage partitions."""
    psi, n = params, world
    return {"zero1": 8 * psi + 8 * psi / n, "zero2": 4 * psi + 12 * psi / n,
            "zero3": 16 * psi / n, "fsdp": 16 * psi / n}[strategy]


def needed_bytes(path: str, strategy: str, params: int, world: int) -> float:
    """What a run is expected to need on this machine, all ranks together: the paper's state
    (or, for today's path, the whole fp32 model per rank at load, whichever is more) times the
    ratio each path was seen at, plus a fixed GiB per rank."""
    state = paper_state_bytes(strategy, params, world)
    per_rank = 1.5 * state if path == "new" else max(3.5 * state, 2.5 * 4 * params)
    return world * (per_rank + (1 << 30))


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def baseline_checkout(rev: str) -> Path:
    """A detached worktree of `rev` in a temporary directory (removed by `drop_checkout`)."""
    where = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "src"
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=REPO, check=True,
                   capture_output=True, text=True)
    return where


def drop_checkout(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO, capture_output=True)
    shutil.rmtree(where.parent, ignore_errors=True)


def job(name: str, assets: dict, strategy: str, a: argparse.Namespace, ckpt: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"file://{assets['model_dir']}"},
            "dataset": {"uri": f"file://{assets['dataset_path']}", "maxSeqLength": a.seq_len},
            "strategy": STRATEGIES[strategy],
            "training": {"maxSteps": a.steps, "epochs": 1000, "microBatchSize": a.micro_batch,
                         "learningRate": 3.0e-4, "warmupSteps": 0, "lrScheduler": "constant", "precision": "fp32"},
            "resources": {"workers": a.workers, "gpusPerWorker": a.gpus_per_worker, "cpusPerWorker": 1},
            "checkpoint": {"uri": f"file://{ckpt}", "everySteps": a.steps, "keep": 1},
        },
    }


def world(a: argparse.Namespace) -> int:
    return a.workers * max(1, a.gpus_per_worker)


def assets_of(size: str, a: argparse.Namespace) -> dict[str, Any]:
    return build_assets(*SIZES[size], a.workers * a.micro_batch * a.seq_len * a.steps * 2)


def one_run(path: str, size: str, strategy: str, a, workdir: Path, checkout: Path | None) -> dict[str, Any]:
    assets = assets_of(size, a)
    env = base_env()
    env.pop("RAY_ADDRESS", None)  # its own Ray: the workers inherit this PYTHONPATH
    first = [str(checkout / "trainer_image"), str(checkout / "api")] if checkout else []
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), *first, env["PYTHONPATH"]])
    env["BENCH_MEMORY"] = "1"
    tag = f"{path}-{size}-{strategy}"
    ckpt = workdir / f"ckpt-{tag}"
    try:
        r = run_trainer(job(f"mem-{size.lower()}-{strategy}", assets, strategy, a, str(ckpt)), workdir, env, tag,
                        command=[sys.executable, "-m", "finetune_trainer", "--job"])
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)  # a 500M ZeRO checkpoint is 6 GB
    rss, cuda = {}, {}
    for m in r["marks"]:
        if m.get("bench") == "rss":
            rss.setdefault(m["phase"], {})[m["rank"]] = m["peak_rss_kb"] * 1024
            if m.get("cuda_peak_bytes") is not None:
                cuda.setdefault(m["phase"], {})[m["rank"]] = m["cuda_peak_bytes"]
    if set(rss) != {"load", "run"} or any(len(v) != world(a) for v in rss.values()):
        raise RuntimeError(f"{tag}: no peak RSS of every rank in {r['log']}: {rss}")
    code = [m for m in r["marks"] if m.get("bench") == "code"]
    return {"params": assets["params"], "tokens_per_s": r["tokens_per_s"], "load_bytes": rss["load"],
            "run_bytes": rss["run"], "cuda_peak_bytes": cuda or None, "log": r["log"], "trainer_file": code[0]["file"] if code else None}


def read_runs(path: str) -> dict:
    runs = json.loads(Path(path).read_text())
    for r in runs.values():  # JSON object keys are strings; ranks are ints
        for phase in ("load_bytes", "run_bytes"):
            if phase in r:
                r[phase] = {int(k): v for k, v in r[phase].items()}
    return runs


def report(runs: dict, a: argparse.Namespace, sizes: list[str], strategies: list[str]) -> tuple[str, dict]:
    """The table and the ratios from the runs (see the module docstring)."""
    rows, ratios = [], {}
    for size in sizes:
        for strategy in strategies:
            for path in ("today", "new"):
                r, tiny = runs.get(f"{path}/{size}/{strategy}"), runs.get(f"{path}/tiny/{strategy}")
                if r is None or "skipped" in r:
                    rows.append((size, NAMES[strategy], path, "-", "-", "-", "-", "-", "-", r and r["skipped"]))
                    continue
                w = world(a)
                load = max(r["load_bytes"].values()) - max(tiny["load_bytes"].values())
                run = max(r["run_bytes"].values()) - max(tiny["run_bytes"].values())
                model_bytes = 4 * r["params"]
                state = paper_state_bytes(strategy, r["params"], w)
                today = runs.get(f"today/{size}/{strategy}")
                speed = (r["tokens_per_s"] / today["tokens_per_s"]) if path == "new" and today and "skipped" not in today \
                    else None
                q = {"load": load / (model_bytes / w), "run": run / state, "tokens_per_s_vs_today": speed}
                ratios[f"{path}/{size}/{strategy}"] = q
                rows.append((size, NAMES[strategy], path, f"{r['params'] / 1e6:.0f}M",
                             f"{max(r['load_bytes'].values()) / 2**30:.2f}", f"{q['load']:.2f}",
                             f"{max(r['run_bytes'].values()) / 2**30:.2f} / {state / 2**30:.2f}", f"{q['run']:.2f}",
                             f"{r['tokens_per_s']:.0f}" + (f" ({speed:.2f})" if speed else ""), ""))
    text = table(("size", "strategy", "code", "params", "load peak GiB/rank", "load ratio (goal ≤ 1.3)",
                  "run peak / state GiB/rank", "run ratio (goal ≤ 1.3)", "tok/s (new/today)", "note"), rows)
    fixed = {k: {"load_gib": max(v["load_bytes"].values()) / 2**30, "run_gib": max(v["run_bytes"].values()) / 2**30}
             for k, v in runs.items() if "/tiny/" in k}
    if a.gpus_per_worker:
        text += "\n\npeak GPU memory GiB/rank (load/run): " + ", ".join(
            f"{k} {max(v['cuda_peak_bytes']['load'].values()) / 2**30:.2f}/"
            f"{max(v['cuda_peak_bytes']['run'].values()) / 2**30:.2f}"
            for k, v in runs.items() if v.get("cuda_peak_bytes"))
    text += "\n\nfixed share (the tiny model's peaks, GiB/rank): " + ", ".join(
        f"{k.replace('/tiny', '')} {v['load_gib']:.2f}/{v['run_gib']:.2f}" for k, v in fixed.items())
    print(text)
    return text, ratios


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench model_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="125M,500M", help=f"of {', '.join(s for s in SIZES if s != 'tiny')}")
    p.add_argument("--strategies", default="zero1,zero2,zero3,fsdp")
    p.add_argument("--baseline", default=BASELINE_REV, help="the commit of today's path")
    p.add_argument("--baseline-max-params", type=float, default=300e6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--from-runs", help="only the table, from a runs.json an earlier run left in its log folder")
    p.add_argument("--resume-runs", help="a runs.json of an earlier run stopped partway: its measured runs are "
                                         "kept, the rest (and its failed or skipped ones) run now")
    p.add_argument("--gpus-per-worker", type=int, default=0,
                   help="GPU runs (bench/gpu.sh --memory): host RSS as on CPU, plus each rank's peak GPU memory")
    a = p.parse_args(argv)
    sizes = [s for s in a.sizes.split(",") if s]
    strategies = [s for s in a.strategies.split(",") if s]
    if a.from_runs:
        report(read_runs(a.from_runs), a, sizes, strategies)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="bench-model-memory-"))
    checkout = baseline_checkout(a.baseline)
    print(f"model_memory: today's path = {a.baseline} in {checkout}; new path = {REPO}; logs in {workdir}", flush=True)
    runs: dict[str, dict] = {}
    if a.resume_runs:
        runs = {k: v for k, v in read_runs(a.resume_runs).items() if "skipped" not in v}
    try:
        for size in ["tiny", *sizes]:
            for strategy in strategies:
                for path in ("today", "new"):
                    key = f"{path}/{size}/{strategy}"
                    if key in runs:
                        continue
                    params = assets_of(size, a)["params"]
                    if path == "today" and size != "tiny" and params > a.baseline_max_params:
                        runs[key] = {"skipped": f"{params / 1e6:.0f}M > --baseline-max-params"}
                        continue
                    need, free = needed_bytes(path, strategy, params, world(a)), available_bytes()
                    if need > 0.85 * free:
                        # A run killed for memory here would take other processes with it.
                        runs[key] = {"skipped": f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB available"}
                        print(f"  {key}: skipped, {runs[key]['skipped']}", flush=True)
                        continue
                    try:
                        runs[key] = one_run(path, size, strategy, a, workdir, checkout if path == "today" else None)
                    except RuntimeError as exc:  # e.g. killed for memory by Ray: said, not hidden
                        runs[key] = {"skipped": f"failed: {str(exc).splitlines()[0][:120]}"}
                        print(f"  {key}: {runs[key]['skipped']}", flush=True)
                        continue
                    (workdir / "runs.json").write_text(json.dumps(runs, default=str))
                    r = runs[key]
                    print(f"  {key}: load peak/rank {[round(b / 2**30, 2) for b in r['load_bytes'].values()]} GiB, "
                          f"run peak/rank {[round(b / 2**30, 2) for b in r['run_bytes'].values()]} GiB, "
                          f"{r['tokens_per_s']:.0f} tok/s", flush=True)
    finally:
        drop_checkout(checkout)

    text, ratios = report(runs, a, sizes, strategies)
    path = write_results("model_memory", {"settings": dict(vars(a)), "runs": runs, "ratios": ratios, "table": text},
                         ["python", "-m", "bench", "model_memory", *argv])
    print(f"results: {path}; logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
