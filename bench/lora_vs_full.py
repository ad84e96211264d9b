"""LoRA against full fine-tuning: the same model, data and run, under ZeRO-3 and FSDP FULL_SHARD.

Per strategy the trainer (`finetune-train --job FILE --fresh`, joining one Ray instance started
here) runs the job twice, full and with `spec.adapter: {type: lora}` (rank 8 on every attention
and MLP projection, the default targets), alternating full, LoRA, full, LoRA for `--repeats`
rounds. Same Llama-style model as trainer_overhead (built from a config, cached in
.cache/bench-assets/), same jsonl data, micro-batch, sequence length, steps, workers and AdamW.

Figures, each from the trainer's own processes (bench/_hooks/sitecustomize.py with
BENCH_MEMORY=1 adds them from outside; the trainer is not changed):
- trainable parameters: of the prepared model (model_prep.prepare_model), before any wrapping;
- optimizer-state bytes per rank: the tensors in the torch AdamW's state (the two moments and
  the step) on each rank when training ends: FSDP's AdamW over its shard, or the AdamW that
  DeepSpeed's ZeRO-3 optimizer runs over its fp32 partition;
- tokens/s: steady state, from the end of step 1 to the end of the last step (progress events);
- peak RSS: VmHWM of each training process (the worker's whole process: Python, torch, Ray).
LoRA/full ratios use the medians over the rounds.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import table, write_results
from bench.trainer_overhead import (add_shape_args, build_assets, job_document, memory_env, run_trainer,
                                    start_ray)

MODES = ("full", "lora")


def lora_job(job: dict[str, Any], rank: int) -> dict[str, Any]:
    out = copy.deepcopy(job)
    out["metadata"]["name"] += "-lora"
    out["spec"]["adapter"] = {"type": "lora", "rank": rank, "alpha": 2 * rank}
    return out


def figures(run: dict[str, Any]) -> dict[str, Any]:
    marks = run["marks"]
    params = [m for m in marks if m.get("bench") == "params"]
    memory = sorted((m for m in marks if m.get("bench") == "memory"), key=lambda m: m["rank"])
    if not params or not memory:
        raise RuntimeError(f"no BENCH_MEMORY records in {run['log']}")
    return {"tokens_per_s": run["tokens_per_s"], "trainable_params": params[0]["trainable"],
            "total_params": params[0]["total"],
            "optimizer_state_bytes_per_rank": [m["optimizer_state_bytes"] for m in memory],
            "peak_rss_mb_per_rank": [m["peak_rss_kb"] / 1024 for m in memory]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench lora_vs_full", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, hidden=384, layers=8, heads=6, seq=128, mbs=4, steps=12, workers=2,
                   precision="fp32")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    a = p.parse_args(argv)
    a.gpus_per_worker = 0
    strategies = [s for s in a.strategies.split(",") if s]
    assets = build_assets(a.hidden, a.layers, a.heads, a.intermediate, a.vocab,
                          int(a.workers * a.micro_batch * a.seq_len * a.steps * 1.5))
    print(f"lora_vs_full: model {assets['params'] / 1e6:.1f}M params {assets['config']}, "
          f"{a.workers} CPU workers, {a.micro_batch}x{a.seq_len} tokens per worker-step, "
          f"{a.steps} steps, {a.precision}, LoRA rank {a.rank}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-lora-vs-full-"))
    env = memory_env()
    import ray

    env["RAY_ADDRESS"] = start_ray(num_cpus=a.workers)
    results: dict[str, Any] = {}
    try:
        for strategy in strategies:
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
            for rep in range(a.repeats):
                for mode in MODES:
                    tag = f"{strategy}-{mode}-{rep}"
                    job = job_document(f"bench-{strategy}-{rep}", assets, strategy, a, str(workdir / f"ckpt-{tag}"))
                    if mode == "lora":
                        job = lora_job(job, a.rank)
                    f = figures(run_trainer(job, workdir, env, tag))
                    runs[mode].append(f)
                    print(f"  {strategy} {mode} #{rep}: {f['tokens_per_s']:.0f} tok/s, trainable "
                          f"{f['trainable_params']:,}, optimizer state/rank "
                          f"{[round(b / 2**20, 2) for b in f['optimizer_state_bytes_per_rank']]} MiB, "
                          f"peak RSS/rank {[round(r) for r in f['peak_rss_mb_per_rank']]} MB", flush=True)
            med = {m: {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[m]),
                "trainable_params": runs[m][0]["trainable_params"],
                "total_params": runs[m][0]["total_params"],
                "optimizer_state_bytes_per_rank": statistics.median(
                    max(r["optimizer_state_bytes_per_rank"]) for r in runs[m]),
                "peak_rss_mb_per_rank": statistics.median(max(r["peak_rss_mb_per_rank"]) for r in runs[m]),
            } for m in MODES}
            results[strategy] = {"runs": runs, "median": med, "lora_over_full": {
                k: med["lora"][k] / med["full"][k] for k in
                ("trainable_params", "optimizer_state_bytes_per_rank", "tokens_per_s", "peak_rss_mb_per_rank")}}
    finally:
        ray.shutdown()

    rows = []
    names = {"deepspeed": "ZeRO-3", "fsdp": "FSDP FULL_SHARD"}
    for s, r in results.items():
        med, q = r["median"], r["lora_over_full"]
        rows.append((names.get(s, s), f"{med['full']['trainable_params']:,}", f"{med['lora']['trainable_params']:,}",
                     f"{q['trainable_params']:.4f}",
                     f"{med['full']['optimizer_state_bytes_per_rank'] / 2**20:.2f}",
                     f"{med['lora']['optimizer_state_bytes_per_rank'] / 2**20:.2f}",
                     f"{q['optimizer_state_bytes_per_rank']:.4f}",
                     f"{med['full']['tokens_per_s']:.0f}", f"{med['lora']['tokens_per_s']:.0f}",
                     f"{q['tokens_per_s']:.2f}",
                     f"{med['full']['peak_rss_mb_per_rank']:.0f}", f"{med['lora']['peak_rss_mb_per_rank']:.0f}",
                     f"{q['peak_rss_mb_per_rank']:.2f}"))
    text = table(("strategy", "trainable full", "trainable LoRA", "ratio", "optim MiB/rank full",
                  "optim MiB/rank LoRA", "ratio", "tok/s full", "tok/s LoRA", "ratio",
                  "peak RSS MB full", "peak RSS MB LoRA", "ratio"), rows)
    print(text)
    path = write_results("lora_vs_full", {
        "model": assets, "settings": dict(vars(a)), "results": results, "table": text,
    }, ["python", "-m", "bench", "lora_vs_full", *argv])
    print(f"results: {path}; logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
