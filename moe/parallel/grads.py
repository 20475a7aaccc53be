"""Gradient reduction and the global gradient norm under DP and EP.

Why not DDP/FSDP here: one module holds two kinds of parameters that reduce over different groups
(dense over dp, routed experts over expert-data-parallel) with the same divisor; this file states
that rule in one place, and the comparison tests against one process check it.

Scale: each rank's loss is the mean over its own micro-batches, and the global loss is the mean over
the dp ranks. Dense gradients: all-reduce over dp, divide by dp. Expert gradients already hold the
contributions of every EP peer's tokens (the all-to-all backward brings them home), so they are
summed over edp and divided by dp as well (dividing by edp instead doubles them at ep=2:
pytorch #160285).

Tensor parallelism (moe.parallel.tensor_parallel) with sequence parallel: each tp rank holds a slice of
its dp rank's tokens, and edp already counts the tp ranks, so the expert rule is unchanged. A gradient
that is a partial sum over the tp ranks -- a plain parameter that saw only this rank's tokens (the
router), or a replicated DTensor weight whose gradient came back Partial (norms, MLA's shared
projections) -- is summed over tp and averaged over dp in one all-reduce over the dp*tp `routing`
group. A tp-sharded DTensor gradient is complete for its shard and is averaged over dp as before.

Pipeline parallelism: each stage holds its own layers, and the dp, tp, edp and `routing` groups all lie
inside one stage (the mesh's pp dimension is outermost), so the rules above apply per stage unchanged,
with tp as well. Only the norm crosses stages: each rank's sum of squares is whole for its stage (after
the tp and ep sums) and the stages' sums add over pp.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from moe.parallel.inflight import collective
from moe.parallel.mesh import ParallelContext
from moe.parallel.tensor_parallel import is_tp_sharded


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def _local_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """This rank's gradient values (a DTensor's local shard, a view), for parameters that have one."""
    return [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:  # a parameter that took no part still reduces (as zeros) so ranks stay in step
            p.grad = torch.zeros_like(p)
    # DTensor gradients reduce through their local shard (to_local is a view: copy_ writes through).
    return _local_grads(params)


def _all_reduce_mean(grads: list[torch.Tensor], group: dist.ProcessGroup | None, size: int, divisor: int) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if group is not None and size > 1:
        dist.all_reduce(flat, group=group)
    if divisor != 1:
        flat /= divisor
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def split_params(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    dense, experts = [], []
    for name, p in model.named_parameters():
        (experts if is_expert_param(name) else dense).append(p)
    return dense, experts


def reduce_gradients(model: torch.nn.Module, ctx: ParallelContext) -> None:
    if not ctx.distributed:
        return
    dense, experts = split_params(model)
    if ctx.tp > 1:
        dense = _reduce_tp_partial(dense, ctx)
    with collective("dp", "all_reduce", "dense gradients"):
        _all_reduce_mean(_grads(dense), ctx.group("dp"), ctx.dp, ctx.dp)
    with collective("edp", "all_reduce", "expert gradients"):
        _all_reduce_mean(_grads(experts), ctx.group("edp"), ctx.edp, ctx.dp)


def _reduce_tp_partial(params: list[torch.nn.Parameter], ctx: ParallelContext) -> list[torch.nn.Parameter]:
    """Sum the tp-partial gradients over dp*tp (divided by dp) and give them their parameter's layout;
    return the parameters whose gradients are complete per tp rank (for the dp all-reduce)."""
    _grads(params)
    partial, complete = [], []
    for p in params:
        g = p.grad
        if not isinstance(p, DTensor) or (g.placements != p.placements and all(pl.is_partial() for pl in g.placements)):
            partial.append(p)
            continue
        if g.placements != p.placements:  # e.g. a full replicated embedding gradient: keep this rank's shard
            p.grad = g.redistribute(p.device_mesh, p.placements)
        complete.append(p)
    with collective("routing", "all_reduce", "tp-partial gradients"):
        _all_reduce_mean(_grads(partial), ctx.group("routing"), ctx.dp * ctx.tp, ctx.dp)
    for p in partial:
        if isinstance(p, DTensor):  # the values are whole now: say so
            p.grad = DTensor.from_local(p.grad.to_local(), p.device_mesh, p.placements, run_check=False)
    return complete


def global_grad_norm(model: torch.nn.Module, ctx: ParallelContext) -> float:
    """L2 norm over every parameter counted once: dense ones are replicated (count locally), tp-sharded
    ones differ across the tp group (sum their squares over tp), expert shards differ across the ep group
    (sum their squares over ep), pipeline stages own different layers (sum over pp)."""
    dense, experts = split_params(model)
    dev = next(model.parameters()).device
    tp_sharded = [p for p in dense if is_tp_sharded(p)]
    dense = [p for p in dense if not is_tp_sharded(p)]
    dense_sq = _sum_sq(dense, dev)
    expert_sq = _sum_sq(experts, dev)
    if tp_sharded:
        sharded_sq = _sum_sq(tp_sharded, dev)
        with collective("tp", "all_reduce", "tp-sharded gradient norm"):
            dist.all_reduce(sharded_sq, group=ctx.group("tp"))
        dense_sq = dense_sq + sharded_sq
    if ctx.distributed and ctx.ep > 1:
        with collective("ep", "all_reduce", "expert gradient norm"):
            dist.all_reduce(expert_sq, group=ctx.group("ep"))
    total_sq = dense_sq + expert_sq
    if ctx.distributed and ctx.pp > 1:  # pipeline stages hold disjoint layers: add theirs
        with collective("pp", "all_reduce", "gradient norm over pipeline stages"):
            dist.all_reduce(total_sq, group=ctx.group("pp"))
    return math.sqrt(total_sq.item())


def _sum_sq(params: list[torch.nn.Parameter], dev: torch.device) -> torch.Tensor:
    """Sum of squares of this rank's gradient values, in fp64.

    One fused norm launch per dtype (as torch's clip_grad_norm_ does) instead of three small kernels
    per parameter: a model has a hundred-odd parameters, and at small batches every launch counts.
    The norms accumulate in fp64: the CPU's fp32 foreach norm sums sequentially and was off by ~1e-5
    relative on million-element gradients, enough to tell layouts apart.
    """
    local = _local_grads(params)
    if not local:
        return torch.zeros((), dtype=torch.float64, device=dev)
    return torch.stack(torch._foreach_norm(local, 2, dtype=torch.float64)).pow(2).sum()


def clip_gradients(model: torch.nn.Module, total_norm: float, max_norm: float) -> None:
    if max_norm <= 0 or not math.isfinite(total_norm) or total_norm <= max_norm:
        return
    scale = max_norm / (total_norm + 1e-6)
    torch._foreach_mul_(_local_grads(list(model.parameters())), scale)
