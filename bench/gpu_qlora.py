"""QLoRA on a GPU: the trainer's 4-bit path (bitsandbytes NF4 base, LoRA adapter, DeepSpeed ZeRO-2,
bf16), run by bench/gpu.sh --qlora on a machine with an NVIDIA GPU and bitsandbytes installed.

Not a throughput figure: a check that the code path the CPU suite cannot run works end to end.
One `finetune-train --fresh` of a Llama-style model built from a config (trainer_overhead's
assets) with `spec.adapter: {type: qlora, merge: true}` on one GPU; then: the loss fell, the
base's linear layers were 4-bit while training (the run's own `params` record: trainable
parameters are the adapter's alone), the adapter loads with PeftModel.from_pretrained on the
base model and the merged model with AutoModelForCausalLM.from_pretrained, and their logits
agree (both put the adapter on the full-precision base: the merge is not onto the 4-bit one). Results: bench/results/gpu_qlora.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import table, write_results
from bench.trainer_overhead import (add_shape_args, build_assets, job_document, memory_env, run_trainer,
                                    start_ray)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu_qlora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, hidden=1024, layers=8, heads=16, seq=512, mbs=4, steps=30, workers=1,
                   precision="bf16")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_qlora: no CUDA device; QLoRA needs one (bench/gpu.sh --qlora on a GPU machine)", file=sys.stderr)
        return 2
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("gpu_qlora: bitsandbytes is not installed (pip install bitsandbytes)", file=sys.stderr)
        return 2
    a.gpus_per_worker = 1
    assets = build_assets(a.hidden, a.layers, a.heads, a.intermediate, a.vocab,
                          int(a.workers * a.micro_batch * a.seq_len * a.steps * 1.5))
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-qlora-"))
    env = memory_env()
    import ray

    env["RAY_ADDRESS"] = start_ray(num_cpus=max(2, a.workers), num_gpus=a.workers)
    job = job_document("bench-qlora", assets, "deepspeed", a, str(workdir / "ckpt"))
    job["spec"]["strategy"]["deepspeed"] = {"stage": 2}
    job["spec"]["adapter"] = {"type": "qlora", "rank": 16, "alpha": 32, "merge": True}
    job["spec"]["training"].update(learningRate=2.0e-4)
    try:
        run = run_trainer(job, workdir, env, "qlora")
    finally:
        ray.shutdown()
    losses = {e["step"]: e["loss"] for e in run["events"] if e["event"] == "progress"}
    (completed,) = [e for e in run["events"] if e["event"] == "completed"]
    (params,) = [m for m in run["marks"] if m.get("bench") == "params"][:1]
    memory = [m for m in run["marks"] if m.get("bench") == "memory"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = completed["adapterUri"][len("file://"):]
    merged_dir = completed["modelUri"][len("file://"):]
    ids = torch.randint(4, 40, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model_dir"]), adapter_dir).eval()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        diff = (peft(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    checks = [
        ("loss fell", losses[max(losses)] < losses[1], f"{losses[1]:.3f} -> {losses[max(losses)]:.3f}"),
        ("only the adapter trains", params["trainable"] < params["total"] / 10,
         f"{params['trainable']:,} of {params['total']:,} (4-bit weights counted packed)"),
        ("adapter and merged model agree", diff < 1e-3, f"max |logit diff| {diff:.2e}"),
    ]
    text = table(("check", "ok", "detail"), checks) + "\n\n" + table(
        ("tokens/s", "optimizer state MiB", "peak RSS MB"),
        [(run["tokens_per_s"], memory[0]["optimizer_state_bytes"] / 2**20 if memory else None,
          memory[0]["peak_rss_kb"] / 1024 if memory else None)])
    print(text)
    write_results("gpu_qlora", {"model": assets, "settings": dict(vars(a)), "losses": losses, "table": text,
                                "gpu": torch.cuda.get_device_name(0)}, ["python", "-m", "bench", "gpu_qlora", *argv])
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
