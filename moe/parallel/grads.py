"""Gradient reduction and the global gradient norm under DP and EP.

Why not DDP/FSDP here: one module holds two kinds of parameters that reduce over different groups
(dense over dp, routed experts over expert-data-parallel) with the same divisor; this file states
that rule in one place, and the comparison tests against one process check it.

Scale: each rank's loss is the mean over its own micro-batches, and the global loss is the mean over
the dp ranks. Dense gradients: all-reduce over dp, divide by dp. Expert gradients already hold the
contributions of every EP peer's tokens (the all-to-all backward brings them home), so they are
summed over edp and divided by dp as well (dividing by edp instead doubles them at ep=2:
pytorch #160285).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe.parallel.mesh import ParallelContext


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:  # a parameter that took no part still reduces (as zeros) so ranks stay in step
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


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
    _all_reduce_mean(_grads(dense), ctx.group("dp"), ctx.dp, ctx.dp)
    _all_reduce_mean(_grads(experts), ctx.group("edp"), ctx.edp, ctx.dp)


def global_grad_norm(model: torch.nn.Module, ctx: ParallelContext) -> float:
    """L2 norm over every parameter counted once: dense ones are replicated (count locally), expert
    shards differ across the ep group (sum their squares over ep)."""
    dense, experts = split_params(model)
    dev = next(model.parameters()).device
    dense_sq = sum((p.grad.float().pow(2).sum() for p in dense if p.grad is not None), torch.zeros((), device=dev))
    expert_sq = sum((p.grad.float().pow(2).sum() for p in experts if p.grad is not None), torch.zeros((), device=dev))
    if ctx.distributed and ctx.ep > 1:
        dist.all_reduce(expert_sq, group=ctx.group("ep"))
    return math.sqrt((dense_sq + expert_sq).item())


def clip_gradients(model: torch.nn.Module, total_norm: float, max_norm: float) -> None:
    if max_norm <= 0 or not math.isfinite(total_norm) or total_norm <= max_norm:
        return
    scale = max_norm / (total_norm + 1e-6)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
