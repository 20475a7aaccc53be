"""The gradient norm and clipping of one process (moe/parallel/grads.py); the layouts' norms are
compared with one process in the EP, TP and PP tests."""
from __future__ import annotations

import math

import torch

from moe.parallel.grads import clip_gradients, global_grad_norm
from moe.parallel.mesh import ParallelContext


def _model_with_grads() -> torch.nn.Module:
    """Dense and expert parameters (names with `.experts.`), one without a gradient, a large one."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.dense = torch.nn.Linear(700, 1500)
    model.moe = torch.nn.Module()
    model.moe.experts = torch.nn.Linear(33, 17)
    model.unused = torch.nn.Linear(4, 4)
    for p in (*model.dense.parameters(), *model.moe.experts.parameters()):
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
    return model


def test_norm_counts_every_gradient_once_in_fp64():
    model = _model_with_grads()
    exact = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in model.parameters() if p.grad is not None))
    norm = global_grad_norm(model, ParallelContext())
    # fp64 accumulation: far closer than the ~1e-5 of a sequential fp32 sum over a million elements
    assert abs(norm - exact) / exact < 1e-12


def test_clip_scales_every_gradient_to_the_max_norm():
    model = _model_with_grads()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = global_grad_norm(model, ParallelContext())
    clip_gradients(model, norm, max_norm=norm / 4)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p.grad, before[n] * (norm / 4) / (norm + 1e-6), rtol=1e-6, atol=0)
        else:
            assert p.grad is None
    assert abs(global_grad_norm(model, ParallelContext()) - norm / 4) / norm < 1e-6
    clip_gradients(model, norm / 4, max_norm=norm)  # under the limit: untouched
    assert abs(global_grad_norm(model, ParallelContext()) - norm / 4) / norm < 1e-6
