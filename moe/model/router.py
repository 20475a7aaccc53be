"""DeepSeek-V3-style token-choice top-k router.

One forward pass does, for T tokens of width D and E routed experts:

1. ``logits_TE = x_TD @ W_ED^T`` in fp32 (autocast is switched off here: a bf16 router flips
   near-tied top-k choices and makes the balancing signals noisy).
2. ``scores_TE = sigmoid(logits)`` or ``softmax(logits, -1)``.
3. Selection on ``scores + expert_bias`` (aux-loss-free balancing), optionally group-limited:
   experts form ``n_group`` contiguous blocks, a group's score is the sum of its top-2 selection
   scores, and each token keeps its best ``topk_group`` groups before the expert top-k.
4. Gate weights from the *unbiased* scores of the chosen experts: normalised to sum 1 if
   ``norm_topk_prob``, times ``route_scale``.
5. Optional capacity: ``ceil(capacity_factor * T * K / E)`` assignments per expert; the rest get
   ``keep=False`` and gate 0 (``probs``: keep the highest gate weights; ``position``: the earliest
   tokens; ties broken by token order, so the result is deterministic).
6. Balancing losses (see :mod:`moe.model.balancing` for the exact formulas), computed from the
   assignments *before* capacity drops.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moe.config import RouterConfig
from moe.model.balancing import (
    expert_counts,
    normalise_scores,
    sequence_balancing_loss,
    switch_balancing_loss,
    update_expert_bias,
    z_loss,
)
from moe.model.sharded_balancing import sharded_keep_mask, sharded_losses

__all__ = ["RouterOutput", "Router", "update_expert_bias", "validate_router_config", "expert_capacity",
           "capacity_keep_mask"]

SCORE_FUNCS = ("sigmoid", "softmax")
DROP_POLICIES = ("probs", "position")
GROUP_BY = ("experts", "ep_ranks", "nodes")

# Capacity products such as 1.1 * 20 come out as 22.000000000000004 in floating point; without
# this slack ceil() would give one slot more than the formula means.
_CAPACITY_SLACK = 1e-9


@dataclass
class RouterOutput:
    expert_idx_TK: torch.Tensor
    """int64 [T, K]: chosen experts per token (in descending order of selection score)."""
    gate_TK: torch.Tensor
    """fp32 [T, K]: gate weights from the unbiased scores (normalised if asked, times route_scale);
    0 where the assignment was dropped by capacity."""
    keep_TK: torch.Tensor
    """bool [T, K]: False where capacity dropped the assignment (all True when dropless)."""
    tokens_per_expert_E: torch.Tensor
    """int64 [E]: assignments kept per expert, after drops."""
    aux_loss: torch.Tensor
    """fp32 scalar: the coefficient-weighted sum of the enabled losses (0 when none is enabled)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalars: the unweighted losses and the number of dropped assignments."""


def _no_autocast(device_type: str):
    """Switch autocast off for the router matmul (it would otherwise run it in bf16)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()  # e.g. meta tensors: nothing to switch off


def _bad(field_name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{field_name}={value!r} is invalid: {allowed}")


def validate_router_config(cfg: RouterConfig, num_experts: int, top_k: int) -> None:
    """Raise ValueError naming the field (``model.moe.router.<field>``), its value and what is allowed."""
    r = "model.moe.router."
    if not isinstance(num_experts, int) or num_experts < 1:
        raise _bad("model.moe.num_experts", num_experts, "must be an integer >= 1")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise _bad("model.moe.top_k", top_k, f"must be an integer in [1, num_experts={num_experts}]")
    if cfg.score_func not in SCORE_FUNCS:
        raise _bad(r + "score_func", cfg.score_func, f"allowed: {', '.join(SCORE_FUNCS)}")
    if cfg.drop_policy not in DROP_POLICIES:
        raise _bad(r + "drop_policy", cfg.drop_policy, f"allowed: {', '.join(DROP_POLICIES)}")
    if cfg.group_by not in GROUP_BY:
        raise _bad(r + "group_by", cfg.group_by, f"allowed: {', '.join(GROUP_BY)}")
    if not isinstance(cfg.n_group, int) or cfg.n_group < 1:
        raise _bad(r + "n_group", cfg.n_group, "must be an integer >= 1 (1 disables group-limited routing)")
    if num_experts % cfg.n_group != 0:
        raise _bad(r + "n_group", cfg.n_group,
                   f"must divide model.moe.num_experts={num_experts} (groups are equal blocks of experts)")
    if not isinstance(cfg.topk_group, int) or not 1 <= cfg.topk_group <= cfg.n_group:
        raise _bad(r + "topk_group", cfg.topk_group, f"must be an integer in [1, n_group={cfg.n_group}]")
    if cfg.n_group > 1:
        reachable = cfg.topk_group * (num_experts // cfg.n_group)
        if top_k > reachable:
            raise _bad(r + "topk_group", cfg.topk_group,
                       f"with n_group={cfg.n_group} a token reaches only topk_group * num_experts/n_group = "
                       f"{reachable} experts, fewer than model.moe.top_k={top_k}; raise topk_group or lower top_k")
    for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "global_aux_loss_coeff", "z_loss_coeff",
                 "capacity_factor", "bias_update_rate"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise _bad(r + name, v, "must be a finite number >= 0")
    if not isinstance(cfg.route_scale, (int, float)) or not math.isfinite(cfg.route_scale) or cfg.route_scale <= 0:
        raise _bad(r + "route_scale", cfg.route_scale, "must be a finite number > 0")


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """``ceil(capacity_factor * T * K / E)``; callers only use it when capacity_factor > 0."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts - _CAPACITY_SLACK)


def capacity_keep_mask(
    expert_idx_TK: torch.Tensor, priority_TK: torch.Tensor | None, num_experts: int, capacity: int
) -> torch.Tensor:
    """bool [T, K]: which assignments fit in their expert's ``capacity`` slots.

    Within each expert the assignments are ranked by descending ``priority_TK`` (policy ``probs``)
    or, when ``priority_TK`` is None, by token order (policy ``position``); the first ``capacity``
    are kept. Both sorts are stable, so equal priorities fall back to token order (then the k slot)
    and the mask is the same on every run and device.
    """
    T, K = expert_idx_TK.shape
    N = T * K
    flat_e_N = expert_idx_TK.reshape(-1)
    if priority_TK is None:
        order_N = torch.arange(N, device=flat_e_N.device)
    else:
        order_N = torch.sort(priority_TK.reshape(-1), descending=True, stable=True).indices
    # second stable sort by expert id: grouped by expert, priority order preserved inside a group
    by_expert = torch.sort(flat_e_N[order_N], stable=True).indices
    perm_N = order_N[by_expert]
    sorted_e_N = flat_e_N[perm_N]
    counts_E = expert_counts(expert_idx_TK, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert_N = torch.arange(N, device=flat_e_N.device) - starts_E[sorted_e_N]
    keep_N = torch.empty(N, dtype=torch.bool, device=flat_e_N.device)
    keep_N[perm_N] = rank_in_expert_N < capacity
    return keep_N.view(T, K)


class Router(nn.Module):
    """Token-choice top-k router with expert bias, group-limited routing, capacity and balancing losses."""

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig, init_std: float = 0.02) -> None:
        super().__init__()
        validate_router_config(cfg, num_experts, top_k)
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.cfg = cfg
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        # Persistent: the bias is learned state (it moves every step) and must survive checkpoints.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32), persistent=True)
        self.global_group: dist.ProcessGroup | None = None
        """Group over which global_aux_loss sums assignment counts; None means local counts only."""
        self.seq_shard_group: dist.ProcessGroup | None = None
        """Set under sequence parallelism (the tp group): each member routes a contiguous slice of every
        sequence, and losses and capacity count over whole sequences (moe.model.sharded_balancing)."""
        self.reset_parameters()

    @property
    def seq_shards(self) -> int:
        """Ranks that share each sequence (1 without sequence parallelism)."""
        return dist.get_world_size(self.seq_shard_group) if self.seq_shard_group is not None else 1

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        self.expert_bias.zero_()

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, score_func={c.score_func}, "
                f"n_group={c.n_group}, topk_group={c.topk_group}, capacity_factor={c.capacity_factor}")

    # ------------------------------------------------------------------ selection
    def _select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """int64 [T, K]: top-k experts on the biased scores, inside the best topk_group groups."""
        cfg = self.cfg
        choice_TE = scores_TE.detach()
        if cfg.use_expert_bias:
            choice_TE = choice_TE + self.expert_bias.to(choice_TE.device, torch.float32)
        if cfg.n_group > 1:
            T, E = choice_TE.shape
            per_group = E // cfg.n_group
            choice_TGX = choice_TE.view(T, cfg.n_group, per_group)
            # group score: sum of its top-2 selection scores (its max if the group has one expert)
            group_score_TG = choice_TGX.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
            group_idx_TJ = group_score_TG.topk(cfg.topk_group, dim=-1).indices
            group_keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx_TJ, True)
            # -inf rather than 0 (as some ports do): biased sigmoid scores can be negative, and a
            # masked expert must never win.
            choice_TE = choice_TGX.masked_fill(~group_keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
        return choice_TE.topk(self.top_k, dim=-1).indices

    # ------------------------------------------------------------------ forward
    def forward(self, x_TD: torch.Tensor, seq_len: int) -> RouterOutput:
        cfg = self.cfg
        T = x_TD.shape[0]
        E, K = self.num_experts, self.top_k
        if seq_len <= 0 or T % seq_len != 0:
            raise ValueError(f"Router got T={T} tokens, which is not a multiple of seq_len={seq_len}; "
                             "tokens must be [batch * seq_len] with each sequence contiguous")

        with _no_autocast(x_TD.device.type):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if cfg.score_func == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1)

        expert_idx_TK = self._select(scores_TE)
        gate_TK = scores_TE.gather(1, expert_idx_TK)
        if cfg.norm_topk_prob:
            gate_TK = gate_TK / (gate_TK.sum(dim=-1, keepdim=True) + 1e-20)
        gate_TK = gate_TK * cfg.route_scale

        counts_E = expert_counts(expert_idx_TK, E)  # before drops: what the losses see
        sharded = self.seq_shard_group is not None
        dropped = None
        if cfg.capacity_factor > 0:
            # Capacity is per micro-batch: with sequence slices, count the whole micro-batch's tokens.
            capacity = expert_capacity(cfg.capacity_factor, T * self.seq_shards, K, E)
            priority_TK = gate_TK.detach() if cfg.drop_policy == "probs" else None
            if sharded:
                keep_TK, dropped = sharded_keep_mask(expert_idx_TK, priority_TK, seq_len, E, capacity,
                                                     self.seq_shard_group, capacity_keep_mask)
            else:
                keep_TK = capacity_keep_mask(expert_idx_TK, priority_TK, E, capacity)
            gate_TK = gate_TK * keep_TK  # keeps the gradient path of the kept weights
            tokens_per_expert_E = expert_counts(expert_idx_TK, E, keep_TK)
        else:
            keep_TK = torch.ones_like(expert_idx_TK, dtype=torch.bool)
            tokens_per_expert_E = counts_E

        if sharded:
            coeffs = {"load_balancing_loss": cfg.aux_loss_coeff, "seq_load_balancing_loss": cfg.seq_aux_loss_coeff,
                      "global_load_balancing_loss": cfg.global_aux_loss_coeff, "z_loss": cfg.z_loss_coeff}
            aux_loss, metrics = sharded_losses(logits_TE, scores_TE, expert_idx_TK, seq_len, cfg.score_func,
                                               self.seq_shard_group, self.global_group, coeffs)
        else:
            aux_loss, metrics = self._losses(logits_TE, scores_TE, expert_idx_TK, counts_E, seq_len)
        # Sequence parallel: the whole micro-batch's drops (every slice reports the same number).
        metrics["dropped"] = (dropped if dropped is not None else (~keep_TK).sum()).detach()
        return RouterOutput(expert_idx_TK, gate_TK, keep_TK, tokens_per_expert_E, aux_loss, metrics)

    def _losses(self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, expert_idx_TK: torch.Tensor,
                counts_E: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the enabled losses and the unweighted value of each (detached).

        A loss whose coefficient is 0 is still computed for the metrics, but without autograd
        so it keeps no activations alive.
        """
        cfg = self.cfg
        probs_TE = normalise_scores(scores_TE, cfg.score_func)
        global_counts_E = counts_E
        if self.global_group is not None and cfg.global_aux_loss_coeff > 0:
            # Only when the loss is on: an all-reduce inside every router forward is a collective
            # all ranks must reach; with the coefficient 0 the metric reports local counts.
            global_counts_E = counts_E.clone()
            dist.all_reduce(global_counts_E, op=dist.ReduceOp.SUM, group=self.global_group)

        terms = (
            ("load_balancing_loss", cfg.aux_loss_coeff, lambda: switch_balancing_loss(probs_TE, counts_E)),
            ("seq_load_balancing_loss", cfg.seq_aux_loss_coeff,
             lambda: sequence_balancing_loss(probs_TE, expert_idx_TK, seq_len)),
            ("global_load_balancing_loss", cfg.global_aux_loss_coeff,
             lambda: switch_balancing_loss(probs_TE, global_counts_E)),
            ("z_loss", cfg.z_loss_coeff, lambda: z_loss(logits_TE)),
        )
        total = logits_TE.new_zeros((), dtype=torch.float32)
        metrics: dict[str, torch.Tensor] = {}
        for name, coeff, fn in terms:
            with torch.set_grad_enabled(torch.is_grad_enabled() and coeff > 0):
                value = fn()
            if coeff > 0:
                total = total + coeff * value
            metrics[name] = value.detach()
        return total, metrics
