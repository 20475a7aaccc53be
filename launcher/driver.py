"""Ray driver: start or join Ray, preflight, place the workers, verify the topology, train, stream progress.

Order matters: nothing is reserved until the preflight (`launcher.preflight`) has checked the cluster's
nodes against the plan, and no worker trains until the ranks it reported have been verified to be
node-contiguous with EP and TP groups inside nodes (`launcher.topology`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from launcher import flight_recorder
from launcher.placement import WorkerGroup
from launcher.preflight import choose_nodes, read_cluster
from launcher.supervisor import AttemptFailed, watch
from launcher.topology import Layout, assign_ranks, build_placements, format_table, node_devices, write_topology
from moe.config import ClusterConfig, JobConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RayConnectError(RuntimeError):
    """The driver could not join the Ray cluster at cluster.address; the message says how to fix it."""


class WorkerError(RuntimeError):
    """A training worker failed; the message names its rank and carries its error."""

    def __init__(self, rank: int, node: int, message: str) -> None:
        self.rank = rank
        super().__init__(f"worker rank {rank} (node {node}) failed; all workers stopped:\n{message}")


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Make a local Ray advertise 127.0.0.1, so its GCS, raylet and worker ports bind to loopback only.
    Ray resolves `_node_ip_address="127.0.0.1"` to the machine's routable IP unless it believes clusters
    are disabled (its Windows/macOS switch), and then binds every gRPC server to that loopback address."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # another Ray version: keep its own binding
        yield
        return
    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    old_env, old_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old_env


def _set_auth_mode(joining: bool) -> None:
    """Starting a local Ray: RAY_AUTH_MODE=token unless the user set RAY_AUTH_MODE (Ray writes a token to
    ~/.ray/auth_token if there is none), so auth does not depend on the Ray version's default.
    Joining: the mode must match the cluster's, so it is the user's RAY_AUTH_MODE (on a cluster's own
    nodes, e.g. under `ray job submit`, it is inherited from `ray start`). A driver in token mode cannot
    schedule actors on a cluster without auth, so a token is never sent unasked; a cluster that wants one
    is reported by `init_ray` with the fix."""
    if joining or "RAY_AUTH_MODE" in os.environ:
        return
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray caches its config at import; re-read it so the mode applies to this process


def _is_auth_failure(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def init_ray(c: ClusterConfig) -> bool:
    """Join `cluster.address` or start a local Ray; returns True when this call started it.

    Token authentication is set explicitly rather than left to the Ray version's default (see
    `_set_auth_mode`). A local Ray with cluster.dashboard_host on loopback (the default) binds every
    port to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    _set_auth_mode(joining=bool(c.address))
    if c.address:
        try:
            ray.init(address=c.address, **common)
        except Exception as e:
            if _is_auth_failure(e):
                raise RayConnectError(
                    f"cluster.address={c.address}: the cluster requires token authentication and this driver "
                    f"sent no valid token (RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')}); export "
                    "RAY_AUTH_MODE=token and provide the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                    "or ~/.ray/auth_token") from None
            raise
        return True
    local_cpus = max(os.cpu_count() or 1, c.num_workers * c.cpus_per_worker)
    # address="local": always a fresh Ray; a bare ray.init() would join any cluster already running here.
    kwargs: dict[str, Any] = dict(address="local", num_cpus=local_cpus, include_dashboard=False,
                                  dashboard_host=c.dashboard_host)
    if c.dashboard_host in LOOPBACK:
        with _loopback_only():
            ray.init(_node_ip_address="127.0.0.1", **kwargs, **common)
    else:
        ray.init(**kwargs, **common)
    return True


class Progress:
    """One progress bar on the driver, fed by the rank-0 worker."""

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


class RestartsExhausted(WorkerError):
    """Workers failed more often than train.max_failures allows; the message lists every failure."""

    def __init__(self, failures: list[AttemptFailed], max_failures: int, run_dir: str, resume_note: str) -> None:
        self.rank = failures[-1].primary.rank
        lines = [f"training failed {len(failures)} times and was restarted {len(failures) - 1} times "
                 f"(train.max_failures={max_failures}); giving up:"]
        lines += [f"  attempt {i + 1}: {f.primary.headline()}" for i, f in enumerate(failures)]
        lines += ["last failure in full:", failures[-1].details(),
                  f"Fix the cause or raise train.max_failures. The checkpoints stay in {run_dir}/checkpoints: "
                  f"starting the launcher again with hydra.run.dir={run_dir} continues {resume_note}."]
        RuntimeError.__init__(self, "\n".join(lines))


def _resume_point(run_dir: str) -> str:
    """Where a new attempt will continue, for the driver's messages (the workers verify it)."""
    from moe.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not found:
        return "from step 0 (no complete checkpoint yet)"
    step, folder = found[-1]
    return f"from {folder} (step {step + 1})"


def _run_attempt(job: JobConfig, layout: Layout, attempt: int) -> dict[str, Any]:
    """Place the workers, verify the topology, train; the group is always stopped on the way out.
    Raises AttemptFailed when a worker fails (every rank's outcome in it)."""
    import ray
    from ray.util.queue import Empty, Queue

    c, par = job.cluster, job.parallel
    group: WorkerGroup | None = None
    progress: Progress | None = None
    queue = None
    try:
        plan = choose_nodes(read_cluster(c.use_gpu, c.cpus_per_worker), c.num_workers, c.workers_per_node,
                            c.use_gpu, c.cpus_per_worker, layout, par.allow_cross_node_ep)
        group = WorkerGroup(plan, c.use_gpu, c.cpus_per_worker,
                            extra_env=flight_recorder.worker_env(job.run_dir, attempt, c.use_gpu))
        started = group.describe()
        by_index = {s.info.handle_index: s for s in started}
        ranked = assign_ranks([s.info for s in started], [n.node_id for n in plan.nodes])
        placements = build_placements(layout, ranked, plan.workers_per_node, par.allow_cross_node_ep)
        write_topology(os.path.join(job.run_dir, "topology.json"), layout, placements, plan.workers_per_node)
        if attempt == 0:
            print(f"topology: {layout.world} workers on {len(plan.nodes)} node(s), {plan.workers_per_node} per node "
                  f"(verified from the workers' reports; written to {job.run_dir}/topology.json)", file=sys.stderr)
            print(format_table(placements), file=sys.stderr)

        handles = [by_index[w.handle_index].handle for w in ranked]
        node_of_rank = [p.node_index for p in placements]
        master_addr = placements[0].node_ip
        master_port = ray.get(handles[0].free_port.remote())
        queue = Queue(actor_options={"num_cpus": 0})
        devices = node_devices(ranked)
        refs = [h.run.remote(job, rank, layout.world, master_addr, master_port, node_of_rank,
                             queue if rank == 0 else None, c.cpus_per_worker, devices[rank])
                for rank, h in enumerate(handles)]
        progress = Progress(job.logger.progress_bar, job.train.steps)

        def feed_progress() -> None:
            while True:
                try:
                    progress.update(queue.get_nowait())
                except Empty:
                    return

        try:
            return watch(refs, node_of_rank, feed_progress)
        except AttemptFailed as e:
            e.note = flight_recorder.note(job.run_dir, attempt)
            raise
    finally:
        # Also on Ctrl-C: kill the actors first so no worker outlives the driver (stopped ones included).
        if progress is not None:
            progress.close()
        if group is not None:
            group.shutdown()
        if queue is not None:
            queue.shutdown(force=True)  # its actor would otherwise outlive the attempt


def run_training(job: JobConfig) -> dict[str, Any]:
    """Run `job` on the Ray cluster; returns rank 0's summary. Raises ResourceError / TopologyError
    before anything is reserved, WorkerError when a worker fails and no restart is left
    (RestartsExhausted after train.max_failures restarts).

    After a failure every worker is stopped and a fresh group starts, up to train.max_failures times;
    the workers resume from the newest complete checkpoint in the run dir (train.resume=auto)."""
    import ray

    c, par = job.cluster, job.parallel
    layout = Layout(par.dp, par.tp, par.pp, par.ep)
    job.run_dir = os.path.abspath(job.run_dir)  # workers may not share the driver's working directory
    os.makedirs(job.run_dir, exist_ok=True)
    init_ray(c)
    failures: list[AttemptFailed] = []
    attempt_job = job
    try:
        while True:
            attempt = len(failures)
            try:
                summary = _run_attempt(attempt_job, layout, attempt)
                break
            except AttemptFailed as e:
                failures.append(e)
                if not e.retryable:
                    raise WorkerError(e.primary.rank, e.primary.node, e.details()
                                      + "\nnot restarted: this error repeats on a resume from the same state") from None
                if attempt >= job.train.max_failures:
                    if attempt == 0:
                        raise WorkerError(e.primary.rank, e.primary.node, e.details()) from None
                    raise RestartsExhausted(failures, job.train.max_failures, job.run_dir,
                                            _resume_point(job.run_dir)) from None
                where = _resume_point(job.run_dir)
                print(f"[restart {attempt + 1}/{job.train.max_failures}] {e.primary.headline()}; all workers "
                      f"stopped; starting a new group that continues {where}", file=sys.stderr, flush=True)
                if "step 0" not in where and job.train.resume != "auto":
                    # The run's own checkpoints are newer than a named (or no) starting point.
                    attempt_job = dataclasses.replace(job, train=dataclasses.replace(job.train, resume="auto"))
    finally:
        ray.shutdown()
    summary["restarts"] = len(failures)
    summary["failures"] = [f"attempt {i + 1}: {f.primary.headline()}" for i, f in enumerate(failures)]
    path = os.path.join(job.run_dir, "summary.json")
    if os.path.isfile(path):  # rank 0 wrote it; only the driver knows about restarts
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
    return summary
