#!/usr/bin/env bash
# train.cuda_graphs on one GPU: the graph-vs-eager tests, then what the graph saves at the README's batch.
#     bash benchmarks/graph_gpu_checks.sh [out_dir] [parts]     (carry .whl-ray and .whl-test)
# parts, comma-separated: tests (tests/test_cuda_graphs.py), readme (deepseek_small at the README's
# batch, eager against graphed, two runs each taking turns), compile (the same batch with train.compile),
# large (bench_train_backends' own batch, 16 x 2048 tokens in one micro-batch, where the GPU sets the pace).
set -uo pipefail
out=${1:-${OUT:-/tmp/graph_checks}}
parts=,${2:-tests,readme,compile},
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L > "$out/device.txt"
readme="train.seq_len=128 train.global_batch_size=16 train.micro_batch_size=8 train.lr=3e-3"
if [[ $parts == *,tests,* ]]; then
  MOE_TRITON_AUTOTUNE=0 timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda_graphs.py \
    > "$out/tests.txt" 2>&1
  grep -E "graphs vs eager|passed|failed|Error" "$out/tests.txt"
fi
if [[ $parts == *,readme,* ]]; then
  timeout 300 python3 benchmarks/bench_train_backends.py --out "$out/readme" --backends triton,triton+graphs \
    --base triton --steps 60 --repeats 2 $readme 2>&1 | tee "$out/readme.txt" | tail -8
fi
if [[ $parts == *,compile,* ]]; then
  timeout 240 python3 benchmarks/bench_train_backends.py --out "$out/compile" --backends triton,triton+graphs \
    --base triton --steps 60 $readme train.compile=true 2>&1 | tee "$out/compile.txt" | tail -8
fi
if [[ $parts == *,large,* ]]; then
  timeout 300 python3 benchmarks/bench_train_backends.py --out "$out/large" --backends triton,triton+graphs \
    --base triton --steps 25 2>&1 | tee "$out/large.txt" | tail -8
fi
rm -rf "$out"/readme/*/ "$out"/compile/*/ "$out"/large/*/ 2>/dev/null  # run dirs: checkpoints and logs too big to bring back
