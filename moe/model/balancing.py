"""Load-balancing formulas for the MoE router, as small pure functions.

Notation (Megatron / DeepSeek-V3 naming): T tokens, E routed experts, K experts per token.

* ``p_te`` -- the *normalised* router score of expert ``e`` for token ``t``: for softmax routing the
  softmax probability itself; for sigmoid routing ``s_te / (sum_e' s_te' + 1e-20)`` (DeepSeek-V3's
  sequence-wise loss normalises the sigmoid scores per token before averaging). Never biased:
  the expert bias only changes the top-k choice and carries no gradient.
* ``c_e`` -- the number of top-k assignments to expert ``e`` (before any capacity drop).
* ``f_e = c_e / sum_e c_e`` -- the fraction of assignments. Without drops ``sum_e c_e = T * K``,
  so this is the textbook ``c_e / (T * K)``; writing it as a ratio of counts also gives the right
  denominator when the counts were summed over several ranks (the global loss).
* ``P_e = (1 / T) * sum_t p_te`` -- the mean normalised score.

Losses:

* ``aux`` (Switch / GShard, one micro-batch):      ``E * sum_e f_e * P_e``
* ``seq_aux`` (DeepSeek-V3 complementary loss):   the same per sequence, averaged over sequences:
  ``(1 / B) * sum_b E * sum_e f_{b,e} * P_{b,e}`` with ``f_{b,e} = c_{b,e} / (S * K)`` and
  ``P_{b,e}`` the mean of ``p_te`` over the S tokens of sequence ``b``.
* ``global_aux``:  ``E * sum_e f_e^global * P_e`` where the counts are summed over the data ranks
  (``f_e^global = C_e / sum_e C_e``) and ``P_e`` stays local (it carries this rank's gradient).
* ``z``: ``(1 / T) * sum_t logsumexp_e(logits_te)^2``.

Each balancing loss is 1 for perfectly uniform routing (``f_e = P_e = 1/E``), which makes the
logged values comparable across models with different E.

The bias update of aux-loss-free balancing: ``b_e += rate * sign(mean_e'(load_e') - load_e)``:
under-loaded experts get a larger bias (more likely to be chosen), over-loaded ones a smaller one.
"""
from __future__ import annotations

import torch

# Guards a division by a per-token score sum that could underflow to 0 in fp32 (all sigmoids ~0).
_EPS = 1e-20


def normalise_scores(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """The per-token normalised scores ``p_te`` the balancing losses average.

    Softmax scores already sum to 1 per token and are returned unchanged; sigmoid scores are
    divided by their per-token sum (+1e-20), as DeepSeek-V3 does for its sequence-wise loss.
    """
    if score_func == "softmax":
        return scores_TE
    return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + _EPS)


def expert_counts(
    expert_idx_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 [E]: how many of the T*K assignments (only those with keep_TK, if given) went to each expert.

    A scatter-add rather than ``bincount``/boolean indexing: on CUDA those read the data back to
    the host to size their output, a sync in every MoE layer.
    """
    flat_N = expert_idx_TK.reshape(-1)
    ones_N = torch.ones_like(flat_N) if keep_TK is None else keep_TK.reshape(-1).to(torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat_N.device).scatter_add_(0, flat_N, ones_N)


def switch_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` with ``f_e = counts_e / sum(counts)`` and ``P_e = mean_t probs_te``.

    ``probs_TE`` are the normalised scores (see :func:`normalise_scores`) and carry the gradient;
    ``counts_E`` are assignment counts (local for ``aux``, all-reduced for ``global_aux``).
    Returns an fp32 scalar; 0 when there are no tokens.
    """
    T, E = probs_TE.shape
    counts_E = counts_E.to(device=probs_TE.device, dtype=torch.float32)
    # clamp: an empty micro-batch gives 0 rather than 0/0
    f_E = counts_E / counts_E.sum().clamp(min=1.0)
    P_E = probs_TE.float().sum(dim=0) / max(T, 1)
    return E * torch.sum(f_E * P_E)


def sequence_balancing_loss(
    probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise loss: :func:`switch_balancing_loss` per sequence, averaged.

    Tokens are laid out ``[B * S]`` with each sequence contiguous. Per sequence ``b``:
    ``f_{b,e} = c_{b,e} / (S * K)``, ``P_{b,e} = (1/S) sum_{t in b} p_te``, and the loss is
    ``mean_b E * sum_e f_{b,e} * P_{b,e}``.
    """
    T, E = probs_TE.shape
    K = expert_idx_TK.shape[1]
    if seq_len <= 0 or T % seq_len != 0:
        raise ValueError(f"seq_len={seq_len} must be positive and divide the token count T={T}")
    if T == 0:
        return probs_TE.new_zeros((), dtype=torch.float32)
    B = T // seq_len
    # one-hot counts per sequence without a [T, K, E] tensor: scatter K ones per token into [T, E]
    hits_TE = torch.zeros(T, E, device=probs_TE.device, dtype=torch.float32)
    hits_TE.scatter_add_(1, expert_idx_TK, torch.ones_like(expert_idx_TK, dtype=torch.float32))
    f_BE = hits_TE.view(B, seq_len, E).sum(dim=1) / (seq_len * K)
    P_BE = probs_TE.float().view(B, seq_len, E).mean(dim=1)
    return (E * (f_BE * P_BE).sum(dim=-1)).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean_t logsumexp_e(logits_te)^2``, in fp32; 0 when T == 0."""
    T = logits_TE.shape[0]
    return torch.logsumexp(logits_TE.float(), dim=-1).square().sum() / max(T, 1)


def expert_bias_delta(tokens_per_expert_E: torch.Tensor, rate: float) -> torch.Tensor:
    """fp32 [E]: ``rate * sign(mean_load - load_e)`` (0 for experts exactly at the mean)."""
    load_E = tokens_per_expert_E.float()
    return rate * torch.sign(load_E.mean() - load_E)


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing step, in place: ``bias_e += rate * sign(mean_load - load_e)``.

    ``tokens_per_expert_E`` should be the load over the whole step (summed over micro-batches and
    over the data ranks), so that every rank applies the same update and the biases stay identical.
    """
    delta_E = expert_bias_delta(tokens_per_expert_E.to(expert_bias_E.device), rate)
    expert_bias_E.add_(delta_E.to(expert_bias_E.dtype))
