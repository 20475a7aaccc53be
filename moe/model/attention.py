"""Causal self-attention: multi-head latent attention (DeepSeek) and grouped-query attention."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.model.layers import RMSNorm, RotaryTables, apply_rope


class CausalAttention(nn.Module):
    """softmax(q k^T / sqrt(d) + causal mask) v, with k/v heads repeated to q's (GQA).

    A module of its own (it has no parameters) so tensor parallelism can hand it each rank's local heads
    as plain tensors: SDPA has no DTensor rule on every backend."""

    def forward(self, q_BHSQ: torch.Tensor, k_BKSQ: torch.Tensor, v_BKSV: torch.Tensor) -> torch.Tensor:
        repeat = q_BHSQ.shape[1] // k_BKSQ.shape[1]
        if repeat > 1:
            k_BKSQ = k_BKSQ.repeat_interleave(repeat, dim=1)
            v_BKSV = v_BKSV.repeat_interleave(repeat, dim=1)
        if (q_BHSQ.shape[-1] != v_BKSV.shape[-1] and q_BHSQ.is_cuda
                and torch.are_deterministic_algorithms_enabled()):
            return attention_one_head_size(q_BHSQ, k_BKSQ, v_BKSV)
        return F.scaled_dot_product_attention(q_BHSQ, k_BKSQ, v_BKSV, is_causal=True)


def attention_one_head_size(q_BHSQ: torch.Tensor, k_BHSQ: torch.Tensor, v_BHSV: torch.Tensor) -> torch.Tensor:
    """Causal SDPA with the smaller head size zero-padded to the larger, so flash attention can run.

    Flash attention wants q, k and v of one head size; MLA's differ (e.g. 96 and 64). By default cuDNN
    takes such heads, but its backward is not deterministic, so under deterministic algorithms SDPA
    falls back to memory-efficient attention: 6.8 ms per fwd+bwd against 4.0 ms for padded flash on
    deepseek_small's heads (H200, BENCHMARKS.md). Zero columns of v give zero output columns
    (dropped again); zero columns of q and k add nothing to q.k, and the scale stays that of the real
    q head size."""
    qd, vd = q_BHSQ.shape[-1], v_BHSV.shape[-1]
    scale = qd**-0.5
    if vd < qd:
        out = F.scaled_dot_product_attention(q_BHSQ, k_BHSQ, F.pad(v_BHSV, (0, qd - vd)), is_causal=True, scale=scale)
        return out[..., :vd]
    q_BHSQ, k_BHSQ = F.pad(q_BHSQ, (0, vd - qd)), F.pad(k_BHSQ, (0, vd - qd))
    return F.scaled_dot_product_attention(q_BHSQ, k_BHSQ, v_BHSV, is_causal=True, scale=scale)


class MLA(nn.Module):
    """Multi-head latent attention: keys/values come from one low-rank latent per token, and a
    small rotary key shared by all heads carries position (DeepSeek-V2/V3)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        D, H = cfg.hidden_size, cfg.num_heads
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(D, H * qk_dim, bias=False)
        self.wkv_a = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)
        self.rope = RotaryTables(cfg.max_seq_len, self.rope_dim, cfg.rope_theta)
        self.core = CausalAttention()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H = self.num_heads
        if hasattr(self, "wq"):
            q = self.wq(x_BSD)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_BHSQ = q.view(B, S, H, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q_BHSQ.split([self.nope_dim, self.rope_dim], dim=-1)

        latent, k_rope_BSR = self.wkv_a(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v_BHSV = kv.split([self.nope_dim, self.v_dim], dim=-1)

        cos, sin = self.rope(S)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope_BSR.unsqueeze(1), cos, sin).expand(B, H, S, self.rope_dim)
        q_BHSQ = torch.cat([q_nope, q_rope], dim=-1)
        k_BHSQ = torch.cat([k_nope, k_rope], dim=-1)
        out = self.core(q_BHSQ, k_BHSQ, v_BHSV)
        return self.wo(out.transpose(1, 2).reshape(B, S, H * self.v_dim))


class GQA(nn.Module):
    """Grouped-query attention with rotary embeddings over the whole head (Llama, Mixtral)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        D = cfg.hidden_size
        self.wq = nn.Linear(D, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(D, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(D, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, D, bias=False)
        self.rope = RotaryTables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.core = CausalAttention()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope(S)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "mla":
        return MLA(cfg)
    if cfg.attention == "gqa":
        return GQA(cfg)
    raise ValueError(f"model.attention={cfg.attention!r} is not one of ('mla', 'gqa')")
