"""Balancing losses and capacity when each rank routes a slice of every sequence (sequence parallel).

Under tensor parallelism the tokens of one micro-batch [B, S] are split along the sequence: each of
the n ranks of the `tp` group routes [B, S/n]. The losses of :mod:`moe.model.balancing` are defined
over the whole micro-batch (and, for the sequence loss, over whole sequences), so here the counts and
score sums are added over the n slices first (one small all-reduce per layer and micro-batch).

Every loss is linear in the score sums once the counts are fixed (counts carry no gradient). So with
``P = P_local + (P_all - P_local).detach()`` each rank gets the whole-micro-batch *value* (the same on
all slices, as in one process) and *this slice's share* of the gradient; the shares add up to the
single-process gradient when the router's gradients are summed over tp (moe.parallel.grads).

Capacity ranks the assignments of the whole micro-batch: the slices' choices are gathered in
single-process token order, the keep mask is computed as in one process, and each rank keeps its rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe.model.balancing import normalise_scores
from moe.parallel.compat import all_gather_flat


def _whole(local: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The all-slices value with this slice's gradient."""
    return local + (total - local).detach()


def sharded_losses(logits_TE: torch.Tensor, scores_TE: torch.Tensor, expert_idx_TK: torch.Tensor, seq_len: int,
                   score_func: str, group: dist.ProcessGroup, global_group: dist.ProcessGroup | None,
                   coeffs: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the enabled losses and every loss's unweighted value, as Router._losses, for
    T_loc = B * seq_len local tokens that are slices of B sequences of seq_len * n tokens."""
    n = dist.get_world_size(group)
    T_loc, E = scores_TE.shape
    K = expert_idx_TK.shape[1]
    B = T_loc // seq_len
    S, T = seq_len * n, T_loc * n
    probs_TE = normalise_scores(scores_TE, score_func).float()
    hits_TE = torch.zeros(T_loc, E, device=scores_TE.device, dtype=torch.float32)
    hits_TE.scatter_add_(1, expert_idx_TK, torch.ones_like(expert_idx_TK, dtype=torch.float32))
    hits_BE = hits_TE.view(B, seq_len, E).sum(1)
    # Autograd only where a loss is on: with coefficient 0 the value is a metric and keeps nothing alive.
    grad = torch.is_grad_enabled()
    with torch.set_grad_enabled(grad and any(coeffs[k] > 0 for k in coeffs if k != "z_loss")):
        p_sum_BE = probs_TE.view(B, seq_len, E).sum(1)
    with torch.set_grad_enabled(grad and coeffs["z_loss"] > 0):
        z_sum = torch.logsumexp(logits_TE.float(), dim=-1).square().sum()

    # One collective for everything: counts (exact in fp32 below 2^24), score sums, z sum.
    packed = torch.cat([hits_BE.flatten(), p_sum_BE.detach().flatten(), z_sum.detach().view(1)])
    dist.all_reduce(packed, group=group)
    hits_all_BE = packed[:B * E].view(B, E)
    p_BE = _whole(p_sum_BE, packed[B * E:2 * B * E].view(B, E))
    z = _whole(z_sum, packed[-1])

    counts_E = hits_all_BE.sum(0)
    global_counts_E = counts_E
    if global_group is not None and coeffs["global_load_balancing_loss"] > 0:
        # Over the routing group (dp * tp ranks), each slice's own counts once: the micro-batches' total.
        global_counts_E = hits_BE.sum(0)
        dist.all_reduce(global_counts_E, group=global_group)
    P_E = p_BE.sum(0) / max(T, 1)

    def switch(c_E: torch.Tensor) -> torch.Tensor:
        return E * torch.sum(c_E / c_E.sum().clamp(min=1.0) * P_E)

    terms = {
        "load_balancing_loss": lambda: switch(counts_E),
        "seq_load_balancing_loss": lambda: (E * (hits_all_BE / (S * K) * (p_BE / S)).sum(-1)).mean(),
        "global_load_balancing_loss": lambda: switch(global_counts_E),
        "z_loss": lambda: z / max(T, 1),
    }
    total = logits_TE.new_zeros((), dtype=torch.float32)
    metrics: dict[str, torch.Tensor] = {}
    for name, fn in terms.items():
        value = fn()
        if coeffs[name] > 0:
            total = total + coeffs[name] * value
        metrics[name] = value.detach()
    return total, metrics


def sharded_keep_mask(expert_idx_TK: torch.Tensor, priority_TK: torch.Tensor | None, seq_len: int, num_experts: int,
                      capacity: int, group: dist.ProcessGroup, keep_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(this slice's keep mask [T_loc, K], dropped assignments of the whole micro-batch) with the
    capacity ranking of one process: `keep_fn(expert_idx_TK, priority_TK, num_experts, capacity)` runs on
    the gathered micro-batch in single-process token order (sequence-major)."""
    n, me = dist.get_world_size(group), dist.get_rank(group)
    T_loc, K = expert_idx_TK.shape
    B = T_loc // seq_len
    # Expert ids and fp32 priorities are exact in float64: one gather carries both.
    prio = priority_TK if priority_TK is not None else torch.zeros_like(expert_idx_TK, dtype=torch.float32)
    mine = torch.stack([expert_idx_TK.double(), prio.double()], dim=-1).contiguous()
    gathered = torch.empty((n * T_loc, K, 2), dtype=mine.dtype, device=mine.device)  # gloo wants dim 0 stacked
    all_gather_flat(gathered, mine, group=group)
    # [n, B, s, K, 2] -> [B, n, s, K, 2]: sequence b's slices next to each other, as in one process.
    whole = gathered.view(n, B, seq_len, K, 2).transpose(0, 1).reshape(B * n * seq_len, K, 2)
    keep_all_TK = keep_fn(whole[..., 0].long(), whole[..., 1].float() if priority_TK is not None else None,
                          num_experts, capacity)
    keep_TK = keep_all_TK.view(B, n, seq_len, K)[:, me].reshape(T_loc, K)
    return keep_TK, (~keep_all_TK).sum()
