"""Entry point of one training process: join the process group, build the mesh, train."""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from moe.config import JobConfig
from moe.parallel.mesh import build_parallel_context
from moe.train.loop import Report, train


def run_worker(job: JobConfig, rank: int, world_size: int, master_addr: str, master_port: int,
               node_of_rank: list[int] | None = None, report: Report | None = None) -> dict[str, Any]:
    """Rendezvous at rank 0's address, then train. NCCL on GPUs, gloo on CPU."""
    if world_size > 1:
        os.environ["MASTER_ADDR"] = master_addr
        os.environ["MASTER_PORT"] = str(master_port)
        backend = "nccl" if job.cluster.use_gpu else "gloo"
        if job.cluster.use_gpu:
            torch.cuda.set_device(0)  # Ray (or CUDA_VISIBLE_DEVICES) shows each worker its own GPU as 0
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=job.parallel.timeout_s))
    try:
        ctx = build_parallel_context(job.parallel, "cuda" if job.cluster.use_gpu else "cpu", node_of_rank)
        return train(job, report=report, ctx=ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
