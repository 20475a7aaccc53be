#!/usr/bin/env bash
# Every two-GPU check of the P2P expert dispatcher, in two parts that each fit one 10-minute device
# call. Run from the repository root with two GPUs of one node visible:
#     bash benchmarks/p2p_gpu_checks.sh [out_dir] [1|2|all]     (part 1: 1 and 2 below; part 2: 3 and 4)
# 1. correctness: dispatcher edge cases against one process (dropless and capacity) and two real
#    training steps per case through parallel.ep_comm=p2p;
# 2. bench_a2a: identity experts, and Triton experts with their own time subtracted;
# 3. training: ep=2 on two GPUs against one GPU, loss per step and tokens/s;
# 4. the launcher through Ray with parallel.ep_comm=p2p (workers must see their node mates' GPUs).
set -uo pipefail
out=${1:-${OUT:-/tmp/p2p_checks}}
part=${2:-all}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
if [ "$part" != 2 ]; then
MOE_TRITON_AUTOTUNE=0 timeout 300 python3 -m pytest -q tests/test_peer_dispatch.py \
  tests/test_dispatch_edge_cases.py -k "p2p or symmetric or test_dispatch_combine" 2>&1 | tail -5 | tee "$out/tests.txt"
timeout 180 python3 benchmarks/bench_a2a.py --gpus 2 --backward --iters 10 --variants "nccl),p2p" \
  --sizes 256 1024 2>&1 | tee "$out/a2a_identity.txt"
timeout 180 python3 benchmarks/bench_a2a.py --gpus 2 --backward --iters 10 --variants "nccl),p2p" \
  --sizes 256 1024 --expert-ffn 256 2>&1 | tee "$out/a2a_experts.txt"
fi
[ "$part" = 1 ] && exit 0
for comm in p2p nccl; do
  timeout 300 python3 benchmarks/compare_layouts_gpu.py --gpus 2 --dp 2 --ep 2 --steps 20 --backend triton \
    --ep-comm "$comm" --out "/tmp/compare_$comm" 2>&1 | tail -4 | tee "$out/train_$comm.txt"
done
timeout 300 python3 -m launcher model=deepseek_small data=synthetic cluster.use_gpu=true cluster.num_workers=2 \
  parallel.dp=2 parallel.ep=2 parallel.ep_comm=p2p logger.wandb.mode=disabled logger.progress_bar=false \
  train.steps=20 train.seq_len=2048 train.global_batch_size=16 train.micro_batch_size=4 train.lr=3e-4 \
  train.eval_every=0 hydra.run.dir=/tmp/launcher_p2p 2>&1 | tail -4 | tee "$out/launcher_p2p.txt"
