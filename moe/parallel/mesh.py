"""One world DeviceMesh and its expert view.

World ranks are laid out pp (outermost), dp, tp (innermost): rank = (pp_i * dp + dp_i) * tp + tp_i.
The expert view re-reads the same dp*tp ranks of a pipeline stage as edp x ep, ep innermost, so an
EP group is `ep` consecutive ranks; with node-contiguous ranks it stays inside a node.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe.config import ParallelConfig


@dataclass
class ParallelContext:
    """Where this rank sits in every parallel dimension, and the groups it talks over."""

    rank: int = 0
    world_size: int = 1
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    node_of_rank: list[int] = field(default_factory=lambda: [0])
    """Node index of every world rank (from the launcher's verified topology)."""
    mesh: DeviceMesh | None = None
    """World mesh with dims (pp, dp, tp)."""
    expert_mesh: DeviceMesh | None = None
    """Same ranks with dims (pp, edp, ep)."""

    @property
    def edp(self) -> int:
        """Replicas of each expert shard (expert data parallel)."""
        return self.dp * self.tp // self.ep

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def group(self, name: str) -> dist.ProcessGroup | None:
        """Process group of dimension `name` (pp, dp, tp, edp, ep, or `routing`: every rank whose tokens
        are routed by the same layer replica, i.e. the dp*tp ranks of a stage), None when not distributed."""
        if not self.distributed:
            return None
        if name in ("pp", "dp", "tp"):
            return self.mesh.get_group(name)
        if name in ("edp", "ep"):
            return self.expert_mesh.get_group(name)
        if name == "routing":
            return self.routing_group
        raise KeyError(name)

    def group_ranks(self, name: str) -> list[int]:
        """World ranks in this rank's group of dimension `name` (pure arithmetic, for topology reports)."""
        pp_i, inner = divmod(self.rank, self.dp * self.tp)
        base = pp_i * self.dp * self.tp
        if name == "tp":
            start = self.rank - self.rank % self.tp
            return list(range(start, start + self.tp))
        if name == "dp":
            return [base + d * self.tp + inner % self.tp for d in range(self.dp)]
        if name == "ep":
            start = self.rank - self.rank % self.ep
            return list(range(start, start + self.ep))
        if name == "edp":
            return [base + e * self.ep + inner % self.ep for e in range(self.edp)]
        if name == "pp":
            return [p * self.dp * self.tp + inner for p in range(self.pp)]
        if name == "routing":
            return list(range(base, base + self.dp * self.tp))
        raise KeyError(name)


def build_parallel_context(par: ParallelConfig, device_type: str, node_of_rank: list[int] | None = None) -> ParallelContext:
    """Create the meshes (all ranks must call this together) and give every group the configured timeout."""
    if not dist.is_initialized():
        return ParallelContext(node_of_rank=node_of_rank or [0])
    rank, world = dist.get_rank(), dist.get_world_size()
    if par.dp * par.tp * par.pp != world:
        raise ValueError(f"parallel.dp*tp*pp={par.dp * par.tp * par.pp} does not match the {world} started workers")
    ctx = ParallelContext(rank=rank, world_size=world, dp=par.dp, tp=par.tp, pp=par.pp, ep=par.ep,
                          node_of_rank=node_of_rank or [0] * world)
    ctx.mesh = init_device_mesh(device_type, (par.pp, par.dp, par.tp), mesh_dim_names=("pp", "dp", "tp"))
    ctx.expert_mesh = init_device_mesh(device_type, (par.pp, ctx.edp, par.ep), mesh_dim_names=("pp", "edp", "ep"))
    ctx.routing_group = ctx.mesh["dp", "tp"]._flatten("routing").get_group() if par.dp * par.tp > 1 else None
    timeout = datetime.timedelta(seconds=par.timeout_s)
    # Sub-groups do not inherit init_process_group's timeout: set it on each one explicitly.
    from torch.distributed.distributed_c10d import _set_pg_timeout

    for mesh in (ctx.mesh, ctx.expert_mesh):
        for name in mesh.mesh_dim_names:
            _set_pg_timeout(timeout, mesh.get_group(name))
    if ctx.routing_group is not None:
        _set_pg_timeout(timeout, ctx.routing_group)
    return ctx
