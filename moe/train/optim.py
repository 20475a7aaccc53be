"""AdamW with decoupled weight decay groups, and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch

from moe.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Norm gains and embeddings are not decayed: shrinking them towards 0 only hurts.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embeddings" in name else decay).append(p)
    groups = [
        {"params": params, "weight_decay": wd}
        for kind, wd in ((decay, cfg.weight_decay), (no_decay, 0.0))
        # Tensor parallel: DTensor and plain parameters in separate groups, because a fused or foreach
        # step over a list mixing them is refused by DTensor.
        for params in _split_dtensors(kind) if params
    ]
    fused = all(p.is_cuda for p in decay + no_decay) and len(decay + no_decay) > 0
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)


def _split_dtensors(params: list[torch.nn.Parameter]) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    from torch.distributed.tensor import DTensor

    return [p for p in params if not isinstance(p, DTensor)], [p for p in params if isinstance(p, DTensor)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to lr*min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
