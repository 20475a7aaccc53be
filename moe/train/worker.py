"""Entry point of one training process: join the process group, build the mesh, train."""
from __future__ import annotations

import datetime
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from moe.config import JobConfig
from moe.parallel import inflight
from moe.parallel.mesh import ParallelContext, build_parallel_context
from moe.train import faults
from moe.train.loop import Report, train


class CollectiveFailure(RuntimeError):
    """A rank failed inside a collective (a peer timed out, stopped or died); the message names the
    rank, the group and its ranks, the collective and what it carried. One string argument, so it
    pickles through Ray unchanged."""


def describe_collective_failure(e: BaseException, rank: int, ctx: ParallelContext | None, timeout_s: int) -> str:
    c = inflight.current()
    assert c is not None
    try:
        ranks: Any = ctx.group_ranks(c.group) if ctx is not None and c.group != "world" else "all"
    except KeyError:  # a group the context does not name: the report must not hide the real error
        ranks = "?"
    waited = time.monotonic() - c.entered
    text = (f"rank {rank} failed inside collective {c.op} on group '{c.group}' (world ranks {ranks}; {c.what}) "
            f"after {waited:.1f} s in it: {type(e).__name__}: {e}")
    if waited >= 0.9 * timeout_s:
        text += (f"\nA peer in group '{c.group}' did not join within parallel.timeout_s={timeout_s} s: it is "
                 "stopped, hung or much slower (the driver names the ranks that never answered).")
    return text


def run_worker(job: JobConfig, rank: int, world_size: int, master_addr: str, master_port: int,
               node_of_rank: list[int] | None = None, report: Report | None = None,
               local_device: int = 0) -> dict[str, Any]:
    """Rendezvous at rank 0's address, then train. NCCL on GPUs, gloo on CPU. `local_device`: this
    rank's GPU among those the process sees (the launcher shows each worker all of its node's GPUs)."""
    faults.arm(job.run_dir, rank)
    inflight.reset()
    ctx: ParallelContext | None = None
    if world_size > 1:
        os.environ["MASTER_ADDR"] = master_addr
        os.environ["MASTER_PORT"] = str(master_port)
        backend = "nccl" if job.cluster.use_gpu else "gloo"
        if job.cluster.use_gpu:
            torch.cuda.set_device(local_device)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=job.parallel.timeout_s))
    try:
        ctx = build_parallel_context(job.parallel, "cuda" if job.cluster.use_gpu else "cpu", node_of_rank)
        return train(job, report=report, ctx=ctx)
    except Exception as e:
        if inflight.current() is None:
            raise
        raise CollectiveFailure(describe_collective_failure(e, rank, ctx, job.parallel.timeout_s)) from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
