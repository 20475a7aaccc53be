#!/usr/bin/env bash
# The expert kernel's GPU checks and measurements, one GPU. From the repository root:
#     bash benchmarks/expert_gpu_checks.sh [out_dir] [parts]
# parts: comma-separated among the four below. The default, gather,grouped, fits one 10-minute device
# call (carry .whl-ray and .whl-test); run tests, and profile, in calls of their own (on an H200 the
# compiled kernel tests took over 180 s).
# tests:   tests/test_kernels.py compiled, in bf16 and fp32 (first configs only);
# gather:  bench_experts --check on the four shapes in gather mode (the benchmark), 3 rounds;
# grouped: the same in grouped mode (the expert-parallel path), against the pointer-row variant;
# profile: per-kernel times of one fwd+bwd on qwen3_30b_a3b and dsv3_16b, both modes.
# Each part writes one file to out_dir; the tables are at their ends.
set -uo pipefail
out=${1:-${OUT:-/tmp/expert_checks}}
parts=,${2:-gather,grouped},
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L > "$out/device.txt"
bench="python3 benchmarks/bench_experts.py"
if [[ $parts == *,tests,* ]]; then
  MOE_TRITON_AUTOTUNE=0 timeout 480 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 \
    | tail -5 | tee "$out/tests.txt"
fi
if [[ $parts == *,gather,* ]]; then
  timeout 220 $bench --check --backends triton,grouped_mm,torch 2>&1 | grep -v tried > "$out/gather.txt"
  grep '"ok": false' "$out/gather.txt"; grep -A40 "^(mode" "$out/gather.txt"
fi
if [[ $parts == *,grouped,* ]]; then
  timeout 160 $bench --mode grouped --backends triton,triton_ptrrows,grouped_mm 2>&1 | grep -v tried \
    > "$out/grouped.txt"
  grep -A40 "^(mode" "$out/grouped.txt"
fi
if [[ $parts == *,profile,* ]]; then
  for mode in gather grouped; do
    timeout 60 $bench --mode $mode --shapes qwen3_30b_a3b,dsv3_16b --backends triton,grouped_mm --skews uniform \
      --rounds 1 --profile 2>&1 | grep -v tried > "$out/profile_$mode.txt"
    grep -A9 "^# profile.*triton" "$out/profile_$mode.txt"
  done
fi
