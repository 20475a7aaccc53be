"""Profile the EP path on two GPUs: torch.profiler over training steps of deepseek_small at dp=2 ep=2
(rank 0), and the dispatcher alone at one size.

    NCCL_NVLS_ENABLE=0 python benchmarks/profile_ep.py
"""
from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_a2a import IdentityExperts
    from moe.parallel.expert_parallel import AllToAllDispatcher

    E, K, D, T = 64, 8, 7168, 1170
    disp = AllToAllDispatcher(dist.group.WORLD, world, rank, E, layer_id=0)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.rand(T, E, device="cuda").topk(K, dim=-1).indices
    gate = torch.rand(T, K, device="cuda")
    keep = torch.ones_like(idx, dtype=torch.bool)
    for _ in range(3):
        disp.run(x, idx, gate, keep, IdentityExperts())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            disp.run(x, idx, gate, keep, IdentityExperts())
        torch.cuda.synchronize()
    if rank == 0:
        print("== dispatcher alone (64 MiB case), 5 calls")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))

    from moe.parallel.mesh import build_parallel_context
    from moe.train.loop import train
    from tests.conftest import job_from

    job = job_from(["model=deepseek_small", "data=synthetic", "logger.wandb.mode=disabled",
                    "logger.progress_bar=false", "train.steps=3", "train.global_batch_size=8",
                    "train.micro_batch_size=4", "train.seq_len=2048", "train.eval_every=0",
                    "cluster.use_gpu=true", "model.moe.backend=grouped_mm", "parallel.dp=2", "parallel.ep=2",
                    "cluster.num_workers=2"])
    job.run_dir = f"/tmp/prof_run{rank}"
    ctx = build_parallel_context(job.parallel, "cuda", [0, 0])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        summary = train(job, ctx=ctx)
    if rank == 0:
        print("== 3 training steps, dp=2 ep=2; step tokens/s:", summary["losses"], summary["tokens_per_s"])
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port), nprocs=2)
