"""GPU throughput: tokens/s per GPU and model FLOPs utilisation of the project's trainer against the
hand-written loops, for a ~1B-parameter Llama-style model (built from a config) in bf16 on one GPU,
DeepSpeed ZeRO-3 and FSDP FULL_SHARD. Run it with bench/gpu.sh on a machine with an NVIDIA GPU.

Same method as bench/trainer_overhead.py (whose functions this reuses): one Ray instance,
alternating runs (trainer, hand-written, ...), steady-state tokens/s from the end of step 1 to the
end of the last step. MFU = 6 x N x tokens/s per GPU / peak dense bf16 FLOP/s of the GPU, N = all
parameters (embeddings and lm_head included; attention's own FLOPs are not counted, the usual
approximation), the peak taken from PEAK_BF16 by `torch.cuda.get_device_name()`.

`--device cpu --tiny` is a smoke mode for machines without a GPU: a tiny model, one CPU worker,
a few steps, bf16 — it runs every code path (assets, both strategies, trainer and hand-written,
tables, results file) so that the GPU run does not fail on a typo; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import table, write_results
from bench.trainer_overhead import (add_shape_args, alternate, base_env, build_assets,
                                    share_with_this_process, start_ray)

# Dense (no sparsity) bf16 tensor-core peak FLOP/s, from the vendors' data sheets. Matched by
# substring of torch.cuda.get_device_name(), first match wins (order matters: "H100 PCIe"
# before "H100").
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),        # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
]


def peak_for(name: str) -> float | None:
    for key, value in PEAK_BF16:
        if key in name:
            return value
    return None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny model, a few steps")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="override the peak bf16 TFLOP/s (for a GPU missing from the table)")
    # ~1.04B parameters: 18 layers x (4 x 2048^2 + 3 x 2048 x 5504) + 2 x 32000 x 2048.
    add_shape_args(p, hidden=2048, layers=18, heads=16, seq=2048, mbs=4, steps=30, workers=1,
                   precision="bf16")
    p.set_defaults(intermediate=5504, vocab=32000)
    a = p.parse_args(argv)
    if a.tiny:
        a.hidden, a.layers, a.heads, a.intermediate, a.vocab = 64, 2, 4, 128, 1024
        a.seq_len, a.micro_batch, a.steps = 64, 2, 4
    strategies = [s for s in a.strategies.split(",") if s]

    import torch

    if a.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_throughput: no CUDA device (torch.cuda.is_available() is False); "
                  "use --device cpu --tiny for the smoke mode", file=sys.stderr)
            return 2
        a.gpus_per_worker = 1
        gpu_name = torch.cuda.get_device_name(0)
        peak = a.peak_tflops * 1e12 if a.peak_tflops else peak_for(gpu_name)
        n_gpus = a.workers * a.gpus_per_worker
    else:
        a.gpus_per_worker = 0
        gpu_name, peak, n_gpus = "cpu (smoke mode)", None, a.workers

    tokens_needed = int(n_gpus * a.micro_batch * a.seq_len * a.steps * 1.5)
    assets = build_assets(a.hidden, a.layers, a.heads, a.intermediate, a.vocab, tokens_needed)
    n = assets["params"]
    print(f"gpu_throughput: {gpu_name}, peak bf16 {peak / 1e12 if peak else '-'} TFLOP/s; model "
          f"{n / 1e9:.3f}B params {assets['config']}; {a.micro_batch}x{a.seq_len} tokens per "
          f"step per GPU, {a.steps} steps, {a.precision}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    env = base_env()
    share_with_this_process(env)
    import ray
    env["RAY_ADDRESS"] = start_ray(num_cpus=max(2, a.workers * 2),
                                   num_gpus=n_gpus if a.device == "cuda" else None)
    try:
        results = alternate(strategies, assets, a, workdir, env)
    finally:
        ray.shutdown()

    def mfu(tps: float) -> float | None:
        return 6 * n * (tps / n_gpus) / peak if peak else None

    rows, goals = [], {}
    for s, r in results.items():
        t, h = r["trainer_tokens_per_s_median"], r["handwritten_tokens_per_s_median"]
        r["trainer_mfu"], r["handwritten_mfu"] = mfu(t), mfu(h)
        r["trainer_tokens_per_s_per_gpu"], r["handwritten_tokens_per_s_per_gpu"] = t / n_gpus, h / n_gpus
        rows.append((s, t / n_gpus, h / n_gpus, r["ratio_of_medians"],
                     f"{r['trainer_mfu'] * 100:.1f}%" if r["trainer_mfu"] is not None else "-",
                     f"{r['handwritten_mfu'] * 100:.1f}%" if r["handwritten_mfu"] is not None else "-"))
        goals[s] = {"ratio >= 0.97": r["ratio_of_medians"] >= 0.97,
                    "MFU >= 45%": (r["trainer_mfu"] >= 0.45) if r["trainer_mfu"] is not None else None}
    text = table(("strategy", "trainer tok/s/GPU", "hand-written tok/s/GPU", "ratio", "trainer MFU",
                  "hand-written MFU"), rows)
    if a.device == "cpu":
        text += "\n(smoke mode on CPU: the code path ran; these figures say nothing about a GPU)"
    print(text)
    name = "gpu_throughput" if a.device == "cuda" and not a.tiny else "gpu_throughput_smoke"
    path = write_results(name, {
        "device": gpu_name, "peak_bf16_flops": peak, "gpus": n_gpus, "model": assets,
        "settings": vars(a), "results": results, "goals": goals, "table": text,
        "cuda": torch.version.cuda,
    }, ["python", "-m", "bench", "gpu_throughput", *argv])
    print(f"results: {path}; logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
