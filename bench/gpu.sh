#!/usr/bin/env bash
# GPU throughput benchmark: tokens/s per GPU and MFU of the trainer against hand-written loops
# (~1B-parameter Llama-style model, bf16, one GPU, DeepSpeed ZeRO-3 and FSDP FULL_SHARD).
#
#   bench/gpu.sh                      # the real run (needs an NVIDIA GPU and a CUDA build of torch)
#   bench/gpu.sh --steps 50 --micro-batch 8
#   bench/gpu.sh --device cpu --tiny  # smoke mode: exercises the code path on any machine
#   bench/gpu.sh --qlora              # QLoRA's GPU path instead (bitsandbytes 4-bit base, LoRA,
#                                     # ZeRO-2): trains, checks the adapter and merged model
#                                     # (bench/gpu_qlora.py; untested until a GPU is lent)
#   bench/gpu.sh --memory             # bench/model_memory.py on the machine's GPUs (one worker,
#                                     # every GPU a rank; 125M, 500M and 1B): host RSS per rank
#                                     # for load and run against today's path, the ZeRO table,
#                                     # tokens/s, and each rank's peak GPU memory (untested until
#                                     # a GPU is lent); extra options go to model_memory
#
# Results: bench/results/gpu_throughput.json (smoke mode: gpu_throughput_smoke.json; --memory:
# model_memory.json, which a CPU run of model_memory overwrites: keep the one you mean to publish).
# Environment: PYTHON (default .venv/bin/python) must have the project installed
# (`pip install -e '.[trainer]'`) with a torch build that matches the machine's CUDA driver:
# the Makefile's CPU torch pin is for CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

bench=gpu_throughput
if [[ "${1:-}" == "--qlora" ]]; then
    bench=gpu_qlora
    shift
    # The CPU install leaves bitsandbytes out; a GPU machine's environment must add it.
    if ! "$PYTHON" -c "import bitsandbytes" 2>/dev/null; then
        echo "gpu.sh: --qlora needs bitsandbytes in $PYTHON (pip install bitsandbytes)" >&2
        exit 2
    fi
fi
memory=0
if [[ "${1:-}" == "--memory" ]]; then
    bench=model_memory
    memory=1
    shift
fi
smoke=0
for arg in "$@"; do [[ "$arg" == "--tiny" || "$arg" == "cpu" ]] && smoke=1; done

if [[ $smoke == 0 ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu.sh: no nvidia-smi: this machine has no NVIDIA GPU (use --device cpu --tiny)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} sees no CUDA device: install a CUDA build of torch")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
fi

# DeepSpeed JIT-builds its ops once per machine; keep them with the repository's cache.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export RAY_DEDUP_LOGS=0 RAY_USAGE_STATS_ENABLED=0
if [[ $memory == 1 ]]; then
    gpus=$(nvidia-smi -L | wc -l)
    exec "$PYTHON" -m bench model_memory --workers 1 --gpus-per-worker "$gpus" --sizes 125M,500M,1B \
        --baseline-max-params 2e9 "$@"
fi
exec "$PYTHON" -m bench "$bench" "$@"
