"""Parameter counts from the config alone, so plans work for models too large to build."""
from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig


@dataclass
class ParamCounts:
    total: int
    """Every parameter."""
    active: int
    """Parameters used per token: all but the routed experts a token does not pick."""
    routed_experts: int
    """Parameters of all routed experts together."""


def attention_params(cfg: ModelConfig) -> int:
    D, H = cfg.hidden_size, cfg.num_heads
    if cfg.attention == "gqa":
        return D * H * cfg.head_dim * 2 + D * cfg.num_kv_heads * cfg.head_dim * 2
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank > 0:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    else:
        q = D * H * qk
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * D


def count_params_from_config(cfg: ModelConfig) -> ParamCounts:
    D, m = cfg.hidden_size, cfg.moe
    per_expert = 3 * D * m.expert_intermediate_size
    dense_layer = attention_params(cfg) + 3 * D * cfg.dense_intermediate_size + 2 * D
    moe_common = attention_params(cfg) + 2 * D + m.num_experts * D + per_expert * m.num_shared_experts
    routed = per_expert * m.num_experts
    n_moe = cfg.num_layers - cfg.num_dense_layers
    outer = 2 * cfg.vocab_size * D + D
    total = outer + cfg.num_dense_layers * dense_layer + n_moe * (moe_common + routed)
    active = total - n_moe * routed + n_moe * per_expert * m.top_k
    return ParamCounts(total=total, active=active, routed_experts=n_moe * routed)
