"""The worker group: one Ray actor per GPU (or CPU slot), pinned to the nodes the preflight chose.

Why an actor group of our own rather than Ray Train's `TorchTrainer`:
- Rank order. Ray's placement-group bundle order is not node-stable (ray issues 51117, 59547), so
  ranks taken from bundle indices can interleave nodes and put an EP group across the network. Here
  every actor is pinned to a node with a hard `NodeAffinitySchedulingStrategy`, reports the node id
  and GPU it actually got, and ranks are assigned from those reports and verified
  (`launcher.topology.build_placements`), never assumed from the scheduler.
- Fail fast. Ray Train's controller waits forever on an infeasible request by default; the preflight
  (`launcher.preflight`) refuses in seconds, and actors that do not come up within
  `STARTUP_TIMEOUT_S` (resources busy with other jobs) are a named error too.
- The training entry point stays `moe.train.worker.run_worker`, the same function the
  multiprocessing tests call, so nothing about training differs between the two launch paths.
Restarts after a failure (Ray Train's `FailureConfig`) are the driver's: it stops the whole group and
starts a new one that resumes from the last checkpoint (`train.max_failures`, launcher.driver).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from launcher.preflight import Placement, ResourceError
from launcher.topology import WorkerInfo

STARTUP_TIMEOUT_S = 120.0
"""How long actors may take to start (process spawn, runtime env) before the run is refused."""

# Variables workers inherit through Ray's runtime environment. Secrets (WANDB_API_KEY) are left out on
# purpose: wandb reads the key from the worker's own environment or netrc. CUDA_VISIBLE_DEVICES is left
# out too: Ray sets it per actor to the GPU it assigned; `TrainWorker.run` widens it to the node's GPUs.
PASSTHROUGH_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_FR_", "WANDB_", "TRITON_", "GLOO_", "MOE_TEST_", "MOE_TRITON_")
SECRET_NAMES = ("WANDB_API_KEY",)


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """NCCL_*, WANDB_* (minus secrets), the expert kernel's MOE_TRITON_* knobs and friends from the
    driver's environment, for the workers."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k.startswith(PASSTHROUGH_PREFIXES) and k not in SECRET_NAMES}
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off unless the user says otherwise
    return env


class TrainWorker:
    """One training process. Made a Ray actor class by `WorkerGroup` (kept plain here so the module
    imports without Ray and torch)."""

    def describe(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}

    def free_port(self) -> int:
        """A port free on this worker's node, for the torch.distributed rendezvous at rank 0."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, job, rank: int, world_size: int, master_addr: str, master_port: int,
            node_of_rank: list[int], queue, threads: int, devices: tuple[str, int] = ("", 0)) -> dict[str, Any]:
        """`devices`: (CUDA_VISIBLE_DEVICES, index of this worker's GPU in it), from
        `launcher.topology.node_devices`; set before CUDA starts in this process."""
        import torch

        from moe.train.worker import run_worker

        visible, local_device = devices
        if visible:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
            os.environ["LOCAL_RANK"] = str(local_device)  # DeviceMesh's device choice agrees with ours
        torch.set_num_threads(threads)  # the cores Ray reserved for this worker, not the whole node
        report = queue.put if queue is not None else None
        return run_worker(job, rank, world_size, master_addr, master_port, node_of_rank, report,
                          local_device=local_device)


@dataclass
class StartedWorker:
    handle: Any
    info: WorkerInfo


class WorkerGroup:
    """Start `workers_per_node` actors on each chosen node; kill them all on `shutdown`."""

    def __init__(self, placement: Placement, use_gpu: bool, cpus_per_worker: int,
                 extra_env: dict[str, str] | None = None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor_cls = ray.remote(TrainWorker)
        env = {**(extra_env or {}), **worker_env()}  # what the user exported wins
        self.handles: list[Any] = []
        for node in placement.nodes:
            for _ in range(placement.workers_per_node):
                self.handles.append(actor_cls.options(
                    num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                    runtime_env={"env_vars": env},
                ).remote())

    def describe(self, timeout_s: float = STARTUP_TIMEOUT_S) -> list[StartedWorker]:
        import ray

        refs = [h.describe.remote() for h in self.handles]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise ResourceError(f"{len(pending)} of {len(refs)} workers did not start within {timeout_s:g} s; "
                               "the resources the preflight counted are probably busy with another job "
                               "(see `ray status`)")
        out = []
        for i, (h, d) in enumerate(zip(self.handles, ray.get(refs))):
            out.append(StartedWorker(h, WorkerInfo(d["node_id"], d["node_ip"], d["gpu_ids"], i)))
        return out

    def shutdown(self) -> None:
        import ray

        for h in self.handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # already dead: nothing to stop
                pass
        self.handles = []
