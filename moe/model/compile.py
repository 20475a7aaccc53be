"""torch.compile for the dense parts of the model (train.compile).

Each block's norms, attention and dense FFN (or the MoE's shared experts), and the final norm, are
compiled in place (`nn.Module.compile`: parameter names, state dicts and checkpoints are unchanged).
Eager, these are dozens of small memory-bound kernels per block: fp32 RMSNorm, rotary, concatenations,
SwiGLU products. The router and routed experts stay eager: token counts per expert are data-dependent
(they would recompile or break the graph), and the experts already run fused kernels (moe/kernels).
Every block's modules share one compiled graph: Dynamo inlines nn.Modules, so parameters are graph
inputs and identical blocks do not recompile.
"""
from __future__ import annotations

import torch.nn as nn

from moe.model.moe import MoE
from moe.model.transformer import Transformer


def apply_compile(model: Transformer) -> list[str]:
    """Compile the dense submodules of `model` in place; return their names."""
    compiled: list[str] = []

    def compile_(name: str, module: nn.Module | None) -> None:
        if module is not None:
            module.compile()
            compiled.append(name)

    for i, block in model.layers.items():
        compile_(f"layers.{i}.attn_norm", block.attn_norm)
        compile_(f"layers.{i}.attn", block.attn)
        compile_(f"layers.{i}.ffn_norm", block.ffn_norm)
        if isinstance(block.ffn, MoE):
            compile_(f"layers.{i}.ffn.shared", block.ffn.shared)
        else:
            compile_(f"layers.{i}.ffn", block.ffn)
    compile_("norm", model.norm)
    return compiled
