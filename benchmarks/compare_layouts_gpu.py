"""Train the same model and data on one GPU and on a multi-GPU layout; compare losses step by step.

    NCCL_NVLS_ENABLE=0 python benchmarks/compare_layouts_gpu.py --gpus 2 --dp 2 --ep 2 --steps 20
    NCCL_NVLS_ENABLE=0 python benchmarks/compare_layouts_gpu.py --gpus 2 --dp 2 --ep 2 --ep-comm p2p --steps 20
    NCCL_NVLS_ENABLE=0 python benchmarks/compare_layouts_gpu.py --gpus 2 --dp 1 --ep 1 --pp 2 --steps 20
    NCCL_NVLS_ENABLE=0 python benchmarks/compare_layouts_gpu.py --gpus 2 --dp 1 --tp 2 --ep 1 --steps 20

With --tp the dense part (attention, dense MLP, shared experts, embedding, head) is split over tp GPUs
with a sequence-parallel residual stream; the routed experts see each GPU's slice of the tokens.

With --pp the layout runs 1F1B over the step's micro-batches (global batch / (micro-batch * dp) of
them: at least pp; more shrink the bubble (pp-1)/(m+pp-1)).

Both runs use bf16 autocast, the same seed, global batch and micro-batch, so the only differences are
reduction order and bf16 rounding in different places. Prints both loss curves, the largest relative
difference, and tokens/s per GPU of each run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_job(args, dp: int, ep: int, run_dir: str, pp: int = 1, tp: int = 1):
    from tests.conftest import job_from

    job = job_from([
        f"model={args.model}", "data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false",
        f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}", f"train.seq_len={args.seq_len}", "train.eval_every=0",
        "train.warmup_steps=5", "cluster.use_gpu=true", f"model.moe.backend={args.backend}", f"train.lr={args.lr}",
        f"parallel.dp={dp}", f"parallel.ep={ep}", f"parallel.pp={pp}", f"parallel.tp={tp}",
        f"cluster.num_workers={dp * pp * tp}",
    ])
    job.run_dir = run_dir
    return job


def _child(rank: int, world: int, port: int, args, out_dir: str) -> None:
    from moe.train.worker import run_worker

    job = make_job(args, args.dp, args.ep, out_dir, pp=args.pp, tp=args.tp)
    job.parallel.ep_comm = args.ep_comm
    # As the launcher does: every worker sees all GPUs of the node and uses the one of its rank.
    summary = run_worker(job, rank, world, "127.0.0.1", port, local_device=rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (the layout needs gpus = dp * tp * pp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (sequence parallel inside)")
    p.add_argument("--model", default="deepseek_small")
    p.add_argument("--backend", default="grouped_mm")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ep-comm", default="nccl", choices=["nccl", "p2p"], help="parallel.ep_comm of the layout run")
    p.add_argument("--out", default="/tmp/compare_layouts")
    args = p.parse_args()
    if args.gpus != args.dp * args.tp * args.pp:
        p.error(f"--gpus={args.gpus} must equal --dp * --tp * --pp = {args.dp * args.tp * args.pp}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.makedirs(args.out, exist_ok=True)

    single_dir = os.path.join(args.out, "single")
    os.makedirs(single_dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_single, args=(args, single_dir))
    proc.start()
    proc.join()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multi_dir = os.path.join(args.out, "multi")
    os.makedirs(multi_dir, exist_ok=True)
    mp.spawn(_child, args=(args.gpus, port, args, multi_dir), nprocs=args.gpus)

    one = json.load(open(os.path.join(single_dir, "rank0.json")))
    many = json.load(open(os.path.join(multi_dir, "rank0.json")))
    worst = 0.0
    print("| step | 1 GPU loss | layout loss | rel diff |")
    print("|---|---|---|---|")
    for step, (a, b) in enumerate(zip(one["losses"], many["losses"])):
        d = abs(a - b) / abs(a)
        worst = max(worst, d)
        print(f"| {step} | {a:.5f} | {b:.5f} | {d:.2e} |")
    tps_one = one["median_tokens_per_s"]
    tps_many = many["median_tokens_per_s"] / args.gpus
    print(f"max relative loss difference over {args.steps} steps: {worst:.3e}")
    print(f"tokens/s per GPU: 1 GPU {tps_one:.0f}; dp={args.dp} tp={args.tp} ep={args.ep} pp={args.pp} "
          f"ep_comm={args.ep_comm} on {args.gpus} GPUs "
          f"{tps_many:.0f} (ratio {tps_many / tps_one:.3f}); median step after the first three")
    print(f"tokens/s in total: 1 GPU {tps_one:.0f}; {args.gpus} GPUs {many['median_tokens_per_s']:.0f} "
          f"(speed-up {many['median_tokens_per_s'] / tps_one:.2f}x)")


def _single(args, out_dir: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    from moe.train.worker import run_worker

    job = make_job(args, 1, 1, out_dir)
    job.cluster.num_workers = 1
    summary = run_worker(job, 0, 1, "127.0.0.1", 0)
    with open(os.path.join(out_dir, "rank0.json"), "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main()
