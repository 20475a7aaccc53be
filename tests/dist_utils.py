"""Run the real training entry point in several gloo processes and collect every rank's summary."""
from __future__ import annotations

import pickle
import socket
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from moe.config import JobConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, job: JobConfig, node_of_rank, patch, queue) -> None:
    torch.set_num_threads(1)
    try:
        if patch is not None:
            patch()
        from moe.train.worker import run_worker

        # As the launcher does: every process sees all GPUs of the node and uses the one of its rank.
        queue.put((rank, pickle.dumps(run_worker(job, rank, world, "127.0.0.1", port, node_of_rank,
                                                 local_device=rank if job.cluster.use_gpu else 0))))
    except BaseException as e:  # report instead of hanging the parent
        import traceback

        queue.put((rank, pickle.dumps({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})))


def run_distributed(job: JobConfig, world: int, node_of_rank: list[int] | None = None,
                    patch: Callable[[], None] | None = None, timeout_s: float = 300) -> list[dict[str, Any]]:
    """Start `world` processes that each call run_worker; return summaries ordered by rank."""
    return _start_and_collect(world, timeout_s, lambda r, port, queue: (
        _child, (r, world, port, job, node_of_rank, patch, queue)))


# Ranks fork from one server process that imported these once: a spawned rank spent ~4.5 s of CPU
# importing torch and the training code, the bulk of a small distributed test on a 2-core CI machine.
# Forkserver (not fork) keeps the ranks free of the test process's threads and state, as spawn did. The
# server starts with the first distributed test and keeps the environment of that moment: a rank's
# state is changed through `patch`, never through the test process's os.environ.
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.pipelining",
            "moe.train.worker", "moe.train.loop", "tests.dist_utils"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _start_and_collect(world: int, timeout_s: float, target_args) -> list[Any]:
    """Start one process per rank (`target_args(rank, port, queue)` gives its target and args), collect
    each rank's pickled result, and raise one error naming every failed rank."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=t, args=a) for t, a in (target_args(r, port, queue) for r in range(world))]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, payload = queue.get(timeout=timeout_s)
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {o['error']}" for r, o in sorted(results.items()) if isinstance(o, dict) and "error" in o]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]


def _fn_child(rank: int, world: int, port: int, fn, args, queue, backend: str = "gloo") -> None:
    import datetime
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        queue.put((rank, pickle.dumps(fn(rank, world, *args))))
    except BaseException as e:
        import traceback

        queue.put((rank, pickle.dumps({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 180, backend: str = "gloo") -> list[Any]:
    """Run module-level `fn(rank, world, *args)` in `world` processes (gloo, or nccl with one GPU
    each); return results by rank."""
    return _start_and_collect(world, timeout_s, lambda r, port, queue: (
        _fn_child, (r, world, port, fn, args, queue, backend)))
