"""Ray driver: start or join Ray, check resources, run the training worker(s), stream progress."""
from __future__ import annotations

import os
import time
from typing import Any

from moe.config import ClusterConfig, JobConfig

# Variables workers may inherit through Ray's runtime environment. Secrets (WANDB_API_KEY) are
# deliberately absent: wandb reads the key from the worker's own environment or netrc.
PASSTHROUGH_PREFIXES = ("NCCL_", "TORCH_NCCL_", "WANDB_", "TRITON_", "CUDA_")
SECRET_NAMES = ("WANDB_API_KEY",)


class ResourceError(RuntimeError):
    """The cluster cannot host the requested workers; raised before anything is reserved."""


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSTHROUGH_PREFIXES) and k not in SECRET_NAMES}
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off unless the user says otherwise
    return env


def init_ray(c: ClusterConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    common: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True,
                              "runtime_env": {"env_vars": worker_env()}}
    if c.address:
        ray.init(address=c.address, **common)
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, c.num_workers * c.cpus_per_worker),
            include_dashboard=False, dashboard_host=c.dashboard_host, **common,
        )


def check_resources(c: ClusterConfig) -> None:
    """Fail fast (Ray would otherwise queue an infeasible request forever)."""
    import ray

    total = ray.cluster_resources()
    need_cpu = c.num_workers * c.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ResourceError(
            f"cluster.num_workers={c.num_workers} x cluster.cpus_per_worker={c.cpus_per_worker} needs {need_cpu} CPUs, "
            f"the Ray cluster has {total.get('CPU', 0):g}; lower them or add nodes")
    if c.use_gpu and total.get("GPU", 0) < c.num_workers:
        raise ResourceError(
            f"cluster.num_workers={c.num_workers} with cluster.use_gpu=true needs {c.num_workers} GPUs, "
            f"the Ray cluster has {total.get('GPU', 0):g}; lower cluster.num_workers or set cluster.use_gpu=false")


def _worker_class():
    import ray

    @ray.remote
    class TrainWorker:
        def run(self, job: JobConfig, queue, threads: int) -> dict[str, Any]:
            import torch

            from moe.train.loop import train

            torch.set_num_threads(threads)
            return train(job, report=queue.put)

    return TrainWorker


class Progress:
    """One progress bar on the driver, fed by the logging worker."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(self, msg: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.n = msg["step"] + 1
        self.bar.set_postfix(loss=f"{msg['loss']:.4f}", tok_s=f"{msg['tokens_per_s']:.0f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_training(job: JobConfig) -> dict[str, Any]:
    import ray
    from ray.util.queue import Empty, Queue

    c = job.cluster
    if c.num_workers > 1:
        raise ResourceError(f"cluster.num_workers={c.num_workers}: the multi-worker Ray driver is not in this "
                            "version yet; run with cluster.num_workers=1")
    init_ray(c)
    try:
        check_resources(c)
        queue = Queue()
        worker = _worker_class().options(num_cpus=c.cpus_per_worker, num_gpus=1 if c.use_gpu else 0).remote()
        ref = worker.run.remote(job, queue, c.cpus_per_worker)
        progress = Progress(job.logger.progress_bar, job.train.steps)
        try:
            while True:
                done, _ = ray.wait([ref], timeout=0.2)
                while True:
                    try:
                        progress.update(queue.get_nowait())
                    except Empty:
                        break
                if done:
                    break
            return ray.get(ref)
        finally:
            progress.close()
    finally:
        ray.shutdown()
