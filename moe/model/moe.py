"""The MoE block: router -> dispatch -> routed experts -> combine, plus shared experts."""
from __future__ import annotations

import torch
import torch.nn as nn

from moe.config import ModelConfig
from moe.model.dispatch import GroupedExperts, LocalDispatcher
from moe.model.layers import SwiGLU
from moe.model.router import Router


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.moe
        self.num_experts = m.num_experts
        self.top_k = m.top_k
        self.router = Router(cfg.hidden_size, m.num_experts, m.top_k, m.router, cfg.init_std)
        self.experts = GroupedExperts(m.num_experts, cfg.hidden_size, m.expert_intermediate_size, m.backend)
        self.shared = (
            SwiGLU(cfg.hidden_size, m.expert_intermediate_size * m.num_shared_experts)
            if m.num_shared_experts > 0
            else None
        )
        self.dispatcher = LocalDispatcher()
        # Kept assignments per expert summed over the micro-batches of one step: the bias update
        # and the load metrics read it, and the trainer resets it after each optimizer step.
        self.register_buffer("tokens_per_expert_acc", torch.zeros(m.num_experts, dtype=torch.int64), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.metrics: dict[str, torch.Tensor] = {}

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routed = self.router(x_TD, S)
        self.aux_loss = routed.aux_loss
        self.metrics = routed.metrics
        with torch.no_grad():
            self.tokens_per_expert_acc += routed.tokens_per_expert_E.to(self.tokens_per_expert_acc.device)
        out_TD = self.dispatcher.run(x_TD, routed.expert_idx_TK, routed.gate_TK, routed.keep_TK, self.experts)
        out_TD = out_TD.to(x_BSD.dtype)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD.view(B, S, D)
