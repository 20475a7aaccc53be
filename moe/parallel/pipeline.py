"""Pipeline parallelism across layers: which layers each stage owns, and the stage module.

Split: contiguous blocks of layers, chosen to minimise the most expensive stage under a cost model in
forward FLOPs per token (`layer_costs`): a dense layer costs its attention and SwiGLU matmuls, a MoE
layer its attention, router, shared experts and the top_k routed experts a token actually visits (not
all num_experts), both plus the attention score term; the first stage also holds the embedding lookup
(no FLOPs) and the last the final norm and output head (2 * D * V per token, often worth several layers).

Stage module: the full model is built and initialised on every rank (the same seeded init as one
process, parameter by parameter), then each stage keeps its own layers under their original names
(`layers.<id>.`), so parameter names, checkpoint keys and optimizer keys do not depend on the layout.

Balancing losses: in one process the loop backpropagates `(ce + sum_l aux_l) / accum`; a stage's MoE
layers are not on the path of the last stage's loss, so each MoE layer's output passes through
`AuxLossInjector`, whose backward hands the layer's aux loss the gradient `1 / accum` (exactly what the
root of the single-process loss gives it) while the hidden-state gradient passes through unchanged
(Megatron's MoEAuxLossAutoScaler).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from moe.config import ModelConfig
from moe.model.moe import MoE
from moe.model.params import attention_params
from moe.model.transformer import Transformer

ROUTER_KEYS = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss", "z_loss",
               "dropped", "dropped_fraction")
"""Every per-layer metric a MoE layer reports (router.py's losses and drops, moe.py's drop fraction).
Fixed so each stage can fill the same table, with zeros for layers it does not own."""


# ---------------------------------------------------------------------------------------- stage split
def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
    """(forward FLOPs per token of each layer, of the embedding, of the final norm + output head)."""
    D, m = cfg.hidden_size, cfg.moe
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    attn = 2 * attention_params(cfg) + 2 * cfg.num_heads * seq_len * (d_qk + d_v)
    dense = attn + 2 * 3 * D * cfg.dense_intermediate_size
    per_expert = 3 * D * m.expert_intermediate_size
    moe = attn + 2 * (m.num_experts * D + per_expert * (m.top_k + m.num_shared_experts))
    costs = [float(moe if i >= cfg.num_dense_layers else dense) for i in range(cfg.num_layers)]
    return costs, 0.0, float(2 * D * cfg.vocab_size)


def split_layers(costs: list[float], pp: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[range]:
    """Contiguous layer ranges, one per stage, each non-empty, minimising the largest stage cost
    (first stage + `first_extra`, last + `last_extra`); ties go to the split with earlier boundaries.
    Exact dynamic programme, O(pp * L^2): L is at most a few hundred."""
    L = len(costs)
    if not 1 <= pp <= L:
        raise ValueError(f"cannot split {L} layers into {pp} pipeline stages (each stage needs a layer)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> float:  # stage s holding layers [a, b)
        return prefix[b] - prefix[a] + (first_extra if s == 0 else 0.0) + (last_extra if s == pp - 1 else 0.0)

    inf = float("inf")
    # best[s][b]: smallest max cost of stages 0..s covering layers [0, b); cut[s][b]: where stage s starts
    best = [[inf] * (L + 1) for _ in range(pp)]
    cut = [[0] * (L + 1) for _ in range(pp)]
    for b in range(1, L + 1):
        best[0][b] = cost(0, 0, b)
    for s in range(1, pp):
        for b in range(s + 1, L + 1):
            for a in range(s, b):
                v = max(best[s - 1][a], cost(s, a, b))
                if v < best[s][b]:
                    best[s][b], cut[s][b] = v, a
    bounds = [L]
    for s in range(pp - 1, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def stage_layers(cfg: ModelConfig, pp: int, seq_len: int) -> list[range]:
    costs, first, last = layer_costs(cfg, seq_len)
    return split_layers(costs, pp, first, last)


# ------------------------------------------------------------------------------------ aux-loss gradient
class AuxLossInjector(torch.autograd.Function):
    """Identity on `h`; backward also gives `aux` the gradient `scale` (so the balancing loss of a layer
    whose stage never sees the training loss still trains its router)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (aux,) = ctx.saved_tensors
        return grad_h, torch.full_like(aux, ctx.scale), None


# ------------------------------------------------------------------------------------------ stage module
class PipelineStageModel(nn.Module):
    """One stage's share of a `Transformer`: embeddings on the first stage, `layers` (original ids), final
    norm and head on the last. Speaks the parts of the Transformer interface the trainer uses
    (`moe_layers`, `aux_loss`) and records each forward's balancing losses and router metrics, since the
    schedule runs several micro-batches' forwards before any backward."""

    def __init__(self, model: Transformer, layer_ids: range, stage: int, num_stages: int) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.layer_ids = list(layer_ids)
        # Same attribute names as Transformer: parameter names stay `tok_embeddings.weight`, `layers.3...`
        self.tok_embeddings = model.tok_embeddings if self.is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if self.is_last else None
        self.output = model.output if self.is_last else None
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        """Set by the runner: the loop's autocast, entered around the forward only (as in one process)."""
        self.aux_grad_scale = 1.0
        """Gradient each aux loss receives per micro-batch: 1 / (micro-batches per step)."""
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero this step's sums (called before each step's schedule)."""
        self.aux_sum = torch.zeros(())
        self.router_sums: dict[str, torch.Tensor] = {}

    def moe_layers(self) -> dict[int, MoE]:
        return {int(i): b.ffn for i, b in self.layers.items() if isinstance(b.ffn, MoE)}

    def aux_loss(self) -> torch.Tensor:
        losses = [m.aux_loss for m in self.moe_layers().values() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] (first stage) or hidden [B, S, D] -> hidden [B, S, D] or fp32 logits [B, S, V] (last)."""
        aux_losses: list[torch.Tensor] = []
        with self.autocast():
            h = self.tok_embeddings(x) if self.is_first else x
            for i, block in self.layers.items():
                h = block(h)
                if isinstance(block.ffn, MoE):
                    h = self._after_moe(int(i), block.ffn, h, aux_losses)
            if self.is_last:
                h = self.output(self.norm(h))
        if aux_losses:  # one sum per micro-batch, as the single-process loop's model.aux_loss()
            self.aux_sum = self.aux_sum.to(h.device) + torch.stack(aux_losses).sum().detach()
        # fp32 logits: what lm_loss computes from anyway, and a fixed dtype for the stage's output meta.
        return h.float() if self.is_last else h

    def _after_moe(self, layer_id: int, moe: MoE, h: torch.Tensor, aux_losses: list[torch.Tensor]) -> torch.Tensor:
        for k, v in moe.metrics.items():
            key = f"moe/{k}/layer_{layer_id}"
            self.router_sums[key] = self.router_sums.get(key, 0) + v.detach().float()
        aux = moe.aux_loss
        if aux is None:
            return h
        aux_losses.append(aux.to(h.device))
        if torch.is_grad_enabled() and aux.requires_grad:
            h = AuxLossInjector.apply(h, aux, self.aux_grad_scale)
        return h


def build_stage_model(model: Transformer, stage: int, num_stages: int, seq_len: int) -> PipelineStageModel:
    """This stage's part of `model` (built and initialised in full, so every rank has the same weights)."""
    ranges = stage_layers(model.cfg, num_stages, seq_len)
    return PipelineStageModel(model, ranges[stage], stage, num_stages)
