"""Preflight: does the Ray cluster have room for the plan, and on which nodes do the workers go?

Runs before anything is reserved. Ray queues a request it cannot satisfy forever (Ray Train's default
`controller_failure_limit=-1` waits on an infeasible request without end), so the driver reads the
nodes' total resources itself and refuses within seconds, naming what was asked and what exists.
`choose_nodes` is pure so tests can feed it any cluster shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.topology import Layout, TopologyError, layout_problems


class ResourceError(RuntimeError):
    """The cluster cannot host the requested workers; raised before anything is reserved."""


@dataclass(frozen=True)
class NodeSlots:
    """One alive Ray node and how many workers it can host."""

    node_id: str
    node_ip: str
    cpus: float
    gpus: float
    slots: int
    """Workers that fit: GPUs (when use_gpu, also bounded by CPUs) or CPUs // cpus_per_worker."""


@dataclass(frozen=True)
class Placement:
    """The preflight's decision: `workers_per_node` workers on each of `nodes`, in rank order."""

    workers_per_node: int
    nodes: list[NodeSlots]


def slots_for(cpus: float, gpus: float, use_gpu: bool, cpus_per_worker: int) -> int:
    by_cpu = int(cpus + 1e-9) // cpus_per_worker
    return min(int(gpus + 1e-9), by_cpu) if use_gpu else by_cpu


def read_cluster(use_gpu: bool, cpus_per_worker: int) -> list[NodeSlots]:
    """Alive nodes of the connected Ray cluster with their total resources (needs ray.init first)."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        out.append(NodeSlots(n["NodeID"], n.get("NodeManagerAddress", "?"), cpus, gpus,
                             slots_for(cpus, gpus, use_gpu, cpus_per_worker)))
    return out


def _describe(nodes: list[NodeSlots], use_gpu: bool) -> str:
    unit = "GPU workers" if use_gpu else "CPU workers"
    lines = [f"    node {n.node_id[:12]} ({n.node_ip}): {n.cpus:g} CPU, {n.gpus:g} GPU -> {n.slots} {unit}"
             for n in nodes]
    total = sum(n.slots for n in nodes)
    return f"the cluster has {len(nodes)} node(s), {total} worker slots in all:\n" + "\n".join(lines)


def _asked(num_workers: int, workers_per_node: int, use_gpu: bool, cpus_per_worker: int) -> str:
    per = f"1 GPU + {cpus_per_worker} CPU" if use_gpu else f"{cpus_per_worker} CPU (cluster.cpus_per_worker)"
    wpn = f"{workers_per_node} per node" if workers_per_node else "workers_per_node taken from the cluster"
    return (f"asked for cluster.num_workers={num_workers} workers of {per} each, {wpn}, "
            f"the same number on every node")


def choose_nodes(nodes: list[NodeSlots], num_workers: int, workers_per_node: int, use_gpu: bool,
                 cpus_per_worker: int, layout: Layout, allow_cross_node_ep: bool) -> Placement:
    """Pick workers-per-node and the nodes. With workers_per_node=0, try divisors of num_workers from
    the largest down (fewest nodes), preferring one that keeps EP and TP groups inside nodes."""
    ordered = sorted((n for n in nodes if n.slots > 0), key=lambda n: (-n.slots, n.node_ip, n.node_id))

    def fits(w: int) -> bool:
        return sum(1 for n in ordered if n.slots >= w) >= num_workers // w

    if workers_per_node:
        candidates = [workers_per_node] if num_workers % workers_per_node == 0 and fits(workers_per_node) else []
    else:
        candidates = [w for w in range(num_workers, 0, -1) if num_workers % w == 0 and fits(w)]
    if not candidates:
        hint = ("lower cluster.num_workers (and the parallel degrees with it), set cluster.workers_per_node to "
                "what the nodes hold, or add nodes")
        if not use_gpu:
            hint += "; cluster.cpus_per_worker lower fits more workers per node"
        raise ResourceError(f"{_asked(num_workers, workers_per_node, use_gpu, cpus_per_worker)};\n"
                            f"  {_describe(nodes, use_gpu)}\n  {hint}")
    good = [w for w in candidates if not layout_problems(layout, w, allow_cross_node_ep)]
    w = (good or candidates)[0]
    problems = layout_problems(layout, w, allow_cross_node_ep)
    if problems:
        asked = _asked(num_workers, workers_per_node, use_gpu, cpus_per_worker)
        raise TopologyError(f"refused rank layout on this cluster ({asked}; "
                            f"the most workers per node it allows is {w}):\n"
                            + "\n".join(f"  - {x}" for x in problems) + f"\n  {_describe(nodes, use_gpu)}")
    chosen = [n for n in ordered if n.slots >= w][: num_workers // w]
    return Placement(workers_per_node=w, nodes=chosen)
