"""`python -m bench` runs every benchmark with its defaults; `python -m bench NAME [options]`
runs one (`python -m bench NAME --help` lists its options)."""
from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = {
    "operator_scale": "bench.operator_scale",
    "trainer_overhead": "bench.trainer_overhead",
    "checkpoint_io": "bench.checkpoint_io",
    "gpu_throughput": "bench.gpu_throughput",
    "lora_vs_full": "bench.lora_vs_full",
    "gpu_qlora": "bench.gpu_qlora",
    "model_memory": "bench.model_memory",
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks:", ", ".join(BENCHMARKS))
        return 0
    if argv:
        name = argv[0].replace("-", "_")
        if name not in BENCHMARKS:
            print(f"unknown benchmark {argv[0]!r}; one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        return importlib.import_module(BENCHMARKS[name]).main(argv[1:]) or 0
    failures = []
    for name, module in BENCHMARKS.items():
        if name == "gpu_qlora":
            try:
                import torch
                has_gpu = torch.cuda.is_available()
            except ImportError:
                has_gpu = False
            if not has_gpu:
                print("\n=== gpu_qlora: skipped, no GPU (bench/gpu.sh --qlora) ===", flush=True)
                continue
            args = []
        elif name == "gpu_throughput":
            # Needs an NVIDIA GPU for its real figures (bench/gpu.sh); without one its CPU smoke
            # mode only proves the code path, so the full suite runs that.
            args = ["--device", "cpu", "--tiny"]
            try:
                import torch
                if torch.cuda.is_available():
                    args = []
            except ImportError:
                pass
        else:
            args = []
        print(f"\n=== {name} {' '.join(args)} ===", flush=True)
        started = time.monotonic()
        try:
            code = importlib.import_module(module).main(args) or 0
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            import traceback
            traceback.print_exc()
            code = 1
            print(f"{name} failed: {exc}", file=sys.stderr)
        print(f"=== {name}: exit {code} in {time.monotonic() - started:.0f}s ===", flush=True)
        if code:
            failures.append(name)
    if failures:
        print("failed:", ", ".join(failures), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
