"""Trainer overhead: the project's trainer against a hand-written Ray Train loop, same everything.

For each strategy (DeepSpeed ZeRO-3, FSDP FULL_SHARD) the two alternate in ONE Ray instance
(trainer, hand-written, trainer, hand-written, ...): the trainer as the operator runs it
(`finetune-train --job FILE --fresh`, joining the instance through RAY_ADDRESS), the baseline as
`bench.handwritten` loops run by this process. Same Llama-style model (built from a config, saved
with save_pretrained), same jsonl data and tokenizer, same micro-batch and sequence length, same
worker group (N workers x 1 CPU, SPREAD), same AdamW settings.

Tokens/s is steady-state: from the end of optimizer step 1 to the end of the last step. For the
trainer these are its own `progress` events (step 1 and the last step are always printed); for the
baseline rank 0 takes the time at the same points. Checkpoints: the trainer saves one at the last
step only (after the timed window; bench/checkpoint_io.py measures checkpoints).

Then the start-up of one `finetune run` (DeepSpeed ZeRO-3, Ray started by the run itself) split
into its parts, from the trainer's events plus timing marks that bench/_hooks/sitecustomize.py
wraps around a few trainer functions from outside (the trainer is not changed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, VENV_BIN, table, write_results

ASSETS = REPO / ".cache" / "bench-assets"
HOOKS = Path(__file__).resolve().parent / "_hooks"


# --- assets ------------------------------------------------------------------------------------

def build_assets(hidden: int, layers: int, heads: int, intermediate: int | None, vocab: int | None,
                 tokens_needed: int, tag: str = "") -> dict[str, Any]:
    """A Llama-style model from a config (random init, save_pretrained) with the project's tiny
    word-level tokenizer, and a jsonl dataset holding at least `tokens_needed` tokens. Cached by
    shape under .cache/bench-assets/."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer.tiny import build_tokenizer, make_sentences

    sentences = max(400, math.ceil(tokens_needed / 8))  # a tiny sentence is ~8-9 tokens + EOS
    key = f"h{hidden}-l{layers}-a{heads}-i{intermediate}-v{vocab}-s{sentences}{tag}"
    out = ASSETS / key
    model_dir, data = out / "model", out / "data" / "train.jsonl"
    if not (model_dir / "config.json").exists() or not data.exists():
        texts = make_sentences(sentences, seed=0)
        tokenizer = build_tokenizer(texts[:400])  # the grammar's whole vocabulary
        config = LlamaConfig(
            vocab_size=vocab or len(tokenizer), hidden_size=hidden,
            intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
            tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        tmp = out.with_name(out.name + ".tmp")
        (tmp / "data").mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        with open(tmp / "data" / "train.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        if out.exists():
            import shutil
            shutil.rmtree(out)
        tmp.rename(out)
        del model
    cfg = json.loads((model_dir / "config.json").read_text())
    h, l, i, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    # q,k,v,o + gate,up,down + 2 norms per layer; embeddings, lm_head (untied) and final norm.
    params = l * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h
    return {"model_dir": str(model_dir), "dataset_path": str(data), "params": params,
            "non_embedding_params": params - 2 * v * h, "config": {k: cfg[k] for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size")}}


# --- the project's trainer ---------------------------------------------------------------------

def job_document(name: str, assets: dict[str, Any], strategy: str, a: argparse.Namespace,
                 ckpt_dir: str) -> dict[str, Any]:
    strat: dict[str, Any] = {"type": strategy}
    if strategy == "deepspeed":
        strat["deepspeed"] = {"stage": 3}
    else:
        strat["fsdp"] = {"shardingStrategy": "FULL_SHARD"}
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"file://{assets['model_dir']}"},
            "dataset": {"uri": f"file://{assets['dataset_path']}", "maxSeqLength": a.seq_len},
            "strategy": strat,
            "training": {"maxSteps": a.steps, "epochs": 1000, "microBatchSize": a.micro_batch,
                         "learningRate": 3.0e-4, "warmupSteps": 0, "lrScheduler": "constant",
                         "precision": a.precision},
            "resources": {"workers": a.workers, "gpusPerWorker": a.gpus_per_worker,
                          "cpusPerWorker": 1, "memoryPerWorker": "8Gi"},
            # One checkpoint, at the last step: after the timed window.
            "checkpoint": {"uri": f"file://{ckpt_dir}", "everySteps": a.steps, "keep": 1},
        },
    }


def parse_lines(lines: list[str]) -> tuple[list[dict], list[dict]]:
    """(trainer events, bench timing marks) from a driver log."""
    from finetune_api.events import parse_event_line

    events, marks = [], []
    for line in lines:
        e = parse_event_line(line)
        if e is not None:
            # Ray prefixes worker lines with "(RayTrainWorker pid=N)": keep N (rank 0's `started`
            # says which worker is rank 0, whose timing marks are the ones that count).
            pid = line.split("pid=", 1)[1].split(")", 1)[0] if "pid=" in line.split("{", 1)[0] else None
            events.append({**e, "_pid": int(pid) if pid and pid.isdigit() else None})
            continue
        start = line.find('{"bench": ')
        if start >= 0:
            try:
                marks.append(json.loads(line[start:].strip()))
            except ValueError:
                pass
    return events, marks


def run_trainer(job: dict[str, Any], workdir: Path, env: dict[str, str], tag: str,
                command: list[str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    path = workdir / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(job))
    argv = command or [str(VENV_BIN / "finetune-train"), "--job", str(path), "--fresh"]
    if command:
        argv = [*command, str(path), "--fresh"]
    t_spawn = time.time()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    t_exit = time.time()
    log = workdir / f"{tag}.log"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    events, marks = parse_lines(lines)
    progress = sorted((e for e in events if e["event"] == "progress"), key=lambda e: e["step"])
    if proc.returncode != 0 or not progress:
        raise RuntimeError(f"trainer run {tag} failed ({proc.returncode}); see {log}:\n"
                           + "\n".join(lines[-15:]))
    spec = job["spec"]
    tokens_per_step = (spec["resources"]["workers"] * max(1, spec["resources"]["gpusPerWorker"])
                       * spec["training"]["microBatchSize"] * spec["dataset"]["maxSeqLength"])
    first = next(e for e in progress if e["step"] == 1)
    last = progress[-1]
    window = last["time"] - first["time"]
    return {"tokens_per_s": (last["step"] - 1) * tokens_per_step / window, "window_s": window,
            "steps_timed": last["step"] - 1, "tokens_per_step": tokens_per_step,
            "wall_s": t_exit - t_spawn, "t_spawn": t_spawn, "events": events, "marks": marks,
            "log": str(log)}


# --- the hand-written baseline -------------------------------------------------------------------

def run_handwritten(strategy: str, assets: dict[str, Any], a: argparse.Namespace, workdir: Path,
                    tag: str) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bench.handwritten import LOOPS

    use_gpu = a.gpus_per_worker > 0
    trainer = TorchTrainer(
        LOOPS[strategy],
        train_loop_config={"model_dir": assets["model_dir"], "dataset_path": assets["dataset_path"],
                           "seq_len": a.seq_len, "micro_batch_size": a.micro_batch,
                           "steps": a.steps, "learning_rate": 3.0e-4, "precision": a.precision,
                           "timing_path": str(workdir / f"{tag}.timing.json")},
        scaling_config=ScalingConfig(num_workers=a.workers * max(1, a.gpus_per_worker), use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1},
                                     placement_strategy="PACK" if use_gpu else "SPREAD"),
        run_config=RunConfig(name=tag, storage_path=str(workdir / "ray-results")),
    )
    t0 = time.time()
    trainer.fit()
    m = json.loads((workdir / f"{tag}.timing.json").read_text())
    window = m["t_last"] - m["t_first"]
    return {"tokens_per_s": (m["steps"] - 1) * m["tokens_per_step"] / window, "window_s": window,
            "steps_timed": m["steps"] - 1, "tokens_per_step": m["tokens_per_step"],
            "wall_s": time.time() - t0}


def start_ray(num_cpus: int, num_gpus: int | None = None) -> str:
    import ray

    ctx = ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                   log_to_driver=False, configure_logging=False)
    return ctx.address_info["gcs_address"]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    # Ray workers import bench.handwritten; DeepSpeed's CPU comm op is built once per machine.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["RAY_DEDUP_LOGS"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60 turns token auth on by default; a driver that joins (the trainer through
    # RAY_ADDRESS) needs the instance's token, so the bench chooses it and both inherit it.
    env.setdefault("RAY_AUTH_MODE", "token")
    env.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    return env


def share_with_this_process(env: dict[str, str]) -> None:
    """The Ray instance this process starts must see the same paths and auth token as the
    trainer processes that join it."""
    os.environ.update({k: env[k] for k in ("PYTHONPATH", "TORCH_EXTENSIONS_DIR", "RAY_DEDUP_LOGS",
                                           "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})


def memory_env() -> dict[str, str]:
    """The environment of a memory benchmark: the hooks on every process's path and
    BENCH_MEMORY=1 (they record peak RSS per phase from outside; the trainer is not changed),
    shared with this process, whose Ray instance the trainers join."""
    env = base_env()
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), env["PYTHONPATH"]])
    env["BENCH_MEMORY"] = "1"
    share_with_this_process(env)
    os.environ["BENCH_MEMORY"] = "1"
    return env


def alternate(strategies: list[str], assets: dict[str, Any], a: argparse.Namespace, workdir: Path,
              env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for strategy in strategies:
        runs: dict[str, list[dict[str, Any]]] = {"trainer": [], "handwritten": []}
        for rep in range(a.repeats):
            tag = f"{strategy}-{rep}"
            job = job_document(f"bench-{tag}", assets, strategy, a, str(workdir / f"ckpt-{tag}"))
            r = run_trainer(job, workdir, env, f"trainer-{tag}")
            runs["trainer"].append({k: v for k, v in r.items() if k not in ("events", "marks")})
            print(f"  {strategy} #{rep}: trainer {r['tokens_per_s']:.0f} tok/s", flush=True)
            h = run_handwritten(strategy, assets, a, workdir, f"handwritten-{tag}")
            runs["handwritten"].append(h)
            print(f"  {strategy} #{rep}: hand-written {h['tokens_per_s']:.0f} tok/s", flush=True)
        t = [r["tokens_per_s"] for r in runs["trainer"]]
        h = [r["tokens_per_s"] for r in runs["handwritten"]]
        out[strategy] = {
            "runs": runs,
            "trainer_tokens_per_s_median": statistics.median(t),
            "handwritten_tokens_per_s_median": statistics.median(h),
            "ratio_of_medians": statistics.median(t) / statistics.median(h),
            # Pairwise ratios (run i of the trainer against run i of the baseline, minutes
            # apart): their spread says how much of a difference the machine's noise explains.
            "pair_ratios": [x / y for x, y in zip(t, h)],
        }
    return out


# --- start-up breakdown -------------------------------------------------------------------------

def startup_breakdown(assets: dict[str, Any], a: argparse.Namespace, workdir: Path,
                      env: dict[str, str]) -> dict[str, Any]:
    """One `finetune run --plain` of a ZeRO-3 job that starts its own Ray: where the time goes
    until the first optimizer step."""
    env = dict(env)
    env.pop("RAY_ADDRESS", None)
    env["BENCH_TIMING"] = "1"
    env["BENCH_TIMING_MARK_START"] = "python_start"  # every process says when it started
    env["PYTHONPATH"] = os.pathsep.join((str(HOOKS), env["PYTHONPATH"]))
    job = job_document("bench-startup", assets, "deepspeed", a, str(workdir / "ckpt-startup"))
    r = run_trainer(job, workdir, env, "startup", command=[str(VENV_BIN / "finetune"), "run", "--plain"])
    ev = {e["event"]: e["time"] for e in reversed(r["events"])}  # the first of each kind
    rank0 = next((e["_pid"] for e in r["events"] if e["event"] == "started"), None)
    marks: dict[str, float] = {}
    for m in r["marks"]:
        # Driver-side marks (preflight, ray.init) and rank 0's worker-side marks.
        if m["bench"] in ("preflight_begin", "preflight_end", "ray_init_begin", "ray_init_end") \
                or m["pid"] == rank0:
            marks.setdefault(m["bench"], m["time"])
    # Rank 0's process: started for the worker group, or an idle worker Ray had started
    # during ray.init and handed to the actor (then its start says nothing about the group).
    spawned = marks.get("python_start")
    if spawned is not None and marks.get("ray_init_end") is not None and spawned < marks["ray_init_end"]:
        spawned = None
    step1 = next(e["time"] for e in r["events"] if e["event"] == "progress" and e["step"] == 1)
    t0 = r["t_spawn"]

    def at(name: str) -> float | None:
        return marks.get(name)

    points = [
        ("CLI, validation, trainer process, imports", t0, at("preflight_begin")),
        ("preflight (bucket/model/dataset checks)", at("preflight_begin"), at("preflight_end")),
        ("import ray, ray.train, TorchTrainer", at("preflight_end"), at("ray_init_begin")),
        ("Ray start (ray.init)", at("ray_init_begin"), at("ray_init_end")),
        ("worker group: until rank 0's process starts", at("ray_init_end"), spawned),
        ("worker group: rank 0 imports, actor setup", spawned or at("ray_init_end"), at("process_group_begin")),
        ("worker group: torch.distributed process group", at("process_group_begin"), at("process_group_end")),
        ("worker group: until train_func runs", at("process_group_end"), at("train_func_data_begin")),
        ("tokenizer + data load/tokenize/pack", at("train_func_data_begin"), at("model_load_begin")),
        ("model load (from_pretrained)", at("model_load_begin"), at("model_load_end")),
        ("optimizer build", at("model_load_end"), at("deepspeed_init_begin")),
        ("DeepSpeed init (ZeRO-3 partition)", at("deepspeed_init_begin"), at("deepspeed_init_end")),
        ("checkpoint lookup, broadcast, `started`", at("deepspeed_init_end"), ev.get("started")),
        ("first optimizer step", ev.get("started"), step1),
    ]
    parts = [(label, (b - s) if (s is not None and b is not None) else None) for label, s, b in points]
    return {"parts": parts, "total_to_first_step_s": step1 - t0, "wall_s": r["wall_s"],
            "marks": marks, "log": r["log"]}


# --- main ---------------------------------------------------------------------------------------

def add_shape_args(p: argparse.ArgumentParser, *, hidden: int, layers: int, heads: int, seq: int,
                   mbs: int, steps: int, workers: int, precision: str) -> None:
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--intermediate", type=int, default=None, help="default 2 x hidden")
    p.add_argument("--vocab", type=int, default=None, help="default: the tokenizer's")
    p.add_argument("--seq-len", type=int, default=seq)
    p.add_argument("--micro-batch", type=int, default=mbs)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--workers", type=int, default=workers)
    p.add_argument("--precision", default=precision, choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=2, help="runs of each, alternating (>= 2)")
    p.add_argument("--strategies", default="deepspeed,fsdp")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench trainer_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, hidden=384, layers=8, heads=6, seq=128, mbs=4, steps=30, workers=2,
                   precision="fp32")
    p.add_argument("--no-startup", action="store_true", help="skip the start-up breakdown")
    p.add_argument("--startup-only", action="store_true", help="only the start-up breakdown")
    a = p.parse_args(argv)
    a.gpus_per_worker = 0
    strategies = [s for s in a.strategies.split(",") if s]
    tokens_needed = int(a.workers * a.micro_batch * a.seq_len * a.steps * 1.5)
    assets = build_assets(a.hidden, a.layers, a.heads, a.intermediate, a.vocab, tokens_needed)
    print(f"trainer_overhead: model {assets['params'] / 1e6:.1f}M params {assets['config']}, "
          f"{a.workers} CPU workers, {a.micro_batch}x{a.seq_len} tokens per worker-step, "
          f"{a.steps} steps, {a.precision}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-trainer-overhead-"))
    env = base_env()
    share_with_this_process(env)
    startup = None
    if not a.no_startup:
        # First, before this process starts Ray: `finetune run` starts its own, as on a laptop.
        print("  start-up breakdown (finetune run, ZeRO-3) ...", flush=True)
        startup = startup_breakdown(assets, a, workdir, env)
    results: dict[str, Any] = {}
    if not a.startup_only:
        import ray
        env["RAY_ADDRESS"] = start_ray(num_cpus=a.workers)
        try:
            results = alternate(strategies, assets, a, workdir, env)
        finally:
            ray.shutdown()

    rows = []
    for s, r in results.items():
        rows.append((s, r["trainer_tokens_per_s_median"], r["handwritten_tokens_per_s_median"],
                     r["ratio_of_medians"], ", ".join(f"{x:.3f}" for x in r["pair_ratios"]),
                     "met" if r["ratio_of_medians"] >= 0.95 else "NOT met"))
    text = table(("strategy", "trainer tok/s (median)", "hand-written tok/s (median)", "ratio",
                  "pair ratios", "goal >= 0.95"), rows)
    if startup:
        text += "\n\n" + table(("finetune run -> first step (ZeRO-3)", "seconds"),
                               [*startup["parts"], ("TOTAL to first step", startup["total_to_first_step_s"])])
    print(text)
    path = write_results("trainer_overhead", {
        "model": assets, "settings": {k: v for k, v in vars(a).items()},
        "results": results, "startup": startup, "table": text,
        "goal": "trainer/hand-written tokens/s >= 0.95 on CPU",
    }, ["python", "-m", "bench", "trainer_overhead", *argv])
    print(f"results: {path}; logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
