"""The decoder-only transformer: embeddings, blocks (dense or MoE FFN), final norm, output head."""
from __future__ import annotations

import torch
import torch.nn as nn

from moe.config import ModelConfig
from moe.model.attention import build_attention
from moe.model.layers import RMSNorm, SwiGLU
from moe.model.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_moe = layer_id >= cfg.num_dense_layers
        self.ffn = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # A ModuleDict keyed by layer id keeps parameter names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens_BS)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))

    def moe_layers(self) -> dict[int, MoE]:
        return {int(i): b.ffn for i, b in self.layers.items() if isinstance(b.ffn, MoE)}

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' weighted balancing losses from the latest forward."""
        losses = [m.aux_loss for m in self.moe_layers().values() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded normal init, identical on every rank for the same seed and config."""
        gen = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> Transformer:
    with torch.device("cpu"):
        model = Transformer(cfg)
    model.init_weights(seed)
    return model.to(device)


def count_params(model: nn.Module, cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token): active counts top_k of the routed experts in each MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - routed + routed * cfg.moe.top_k // max(cfg.moe.num_experts, 1)
    return total, active
