#!/usr/bin/env bash
# The GPU checks of train.deterministic (all on one GPU but two_gpu). From the repository root:
#     bash benchmarks/determinism_gpu_checks.sh [out_dir] [parts]
# parts: comma-separated among the five below (default attention,train,kernels: one 10-minute call).
# attention: which SDPA kernels run with and without deterministic mode, whether they repeat, their time;
# train:     deepseek_small seq 2048: two deterministic runs per expert backend (bitwise equal?), one
#            default run of each for tokens/s, and a deterministic run with the first kernel config
#            instead of autotuned ones (do the configs change the bits?);
# compile:   two deterministic runs with train.compile=true;
# kernels:   the kernel tests of the combine and of deterministic mode, in bf16;
# two_gpu:   (needs two GPUs) dp=2 x ep=2 under train.deterministic: a repeat of the run (the noise
#            floor) and a run killed at step 11 and resumed must both equal the reference bit for bit.
set -uo pipefail
out=${1:-${OUT:-/tmp/determinism_checks}}
parts=,${2:-attention,train,kernels},
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L > "$out/device.txt"
train="python3 benchmarks/bench_train_backends.py --steps 20"
if [[ $parts == *,attention,* ]]; then
  timeout 90 python3 benchmarks/bench_attention_determinism.py 2>&1 | tee "$out/attention.txt"
fi
if [[ $parts == *,train,* ]]; then
  timeout 240 $train --out /tmp/det --backends triton,grouped_mm --repeats 2 train.deterministic=true 2>&1 \
    | tee "$out/train_deterministic.txt"
  timeout 100 $train --out /tmp/default --backends triton,grouped_mm 2>&1 | tee "$out/train_default.txt"
  MOE_TRITON_AUTOTUNE=0 timeout 60 $train --out /tmp/det_first_config --backends triton train.deterministic=true \
    2>&1 | tee "$out/train_deterministic_first_config.txt"
  python3 - <<'PY' 2>&1 | tee -a "$out/train_deterministic_first_config.txt"
import json, sys
sys.path.insert(0, "benchmarks")
from bench_train_backends import reproducibility
tuned = json.load(open("/tmp/det/results.json"))["triton"]
first = json.load(open("/tmp/det_first_config/results.json"))["triton"]
print("autotuned runs against the first-config run:", reproducibility(tuned + first))
PY
fi
if [[ $parts == *,compile,* ]]; then
  timeout 240 $train --out /tmp/det_compile --backends triton --repeats 2 train.deterministic=true train.compile=true \
    2>&1 | tee "$out/train_deterministic_compile.txt"
fi
if [[ $parts == *,two_gpu,* ]]; then
  export NCCL_NVLS_ENABLE=0
  timeout 420 python3 benchmarks/kill_resume_gpu.py --world 2 --deterministic --backend triton --steps 20 \
    --kill-step 11 --checkpoint-every 7 --out /tmp/kill_resume_det2 2>&1 | tee "$out/two_gpu_deterministic.txt"
fi
if [[ $parts == *,kernels,* ]]; then
  timeout 150 python3 -m pytest -q tests/test_kernels.py -k "bitwise or scatter_modes" 2>&1 | tail -4 \
    | tee "$out/kernel_tests.txt"
fi
