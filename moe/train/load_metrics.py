"""Expert-load metrics from a step's token counts (global over the routing group).

Names follow what Megatron users' dashboards show: per layer with a `/layer_{i}` suffix, and a
summary without it (the worst layer for factors, the total for counts)."""
from __future__ import annotations

import math

import torch


def layer_load_metrics(tokens_per_expert_E: torch.Tensor, ep: int = 1) -> dict[str, float]:
    """Imbalance of one layer. `ep` groups consecutive experts into the ranks that hold them."""
    counts = tokens_per_expert_E.double()
    total = counts.sum().item()
    E = counts.numel()
    mean = total / E if E else 0.0
    out = {
        "overload_factor": counts.max().item() / mean if mean > 0 else 0.0,
        "min_load_factor": counts.min().item() / mean if mean > 0 else 0.0,
        "load_cv": counts.std(unbiased=False).item() / mean if mean > 0 else 0.0,
        "dead_experts": float((counts == 0).sum().item()),
    }
    if total > 0:
        p = counts / total
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        out["expert_diversity"] = math.exp(entropy) / E  # 1.0 = uniform, 1/E = collapsed on one expert
    else:
        out["expert_diversity"] = 0.0
    per_rank = counts.view(ep, -1).sum(-1)
    out["rank_overload_factor"] = per_rank.max().item() / per_rank.mean().item() if total > 0 else 0.0
    return out


# How each metric summarises over layers.
_WORST = {"overload_factor": max, "min_load_factor": min, "load_cv": max, "expert_diversity": min,
          "rank_overload_factor": max, "dead_experts": sum}


def to_cpu(by_layer: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """One device-to-host copy for all layers (not one per layer and metric): the metrics below then
    cost no GPU round trips."""
    if not by_layer:
        return {}
    layers = list(by_layer)
    stacked_LE = torch.stack([by_layer[i].detach() for i in layers]).cpu()
    return dict(zip(layers, stacked_LE.unbind(0)))


def model_load_metrics(counts_by_layer: dict[int, torch.Tensor], bias_by_layer: dict[int, torch.Tensor],
                       ep: int = 1) -> dict[str, float]:
    counts_by_layer, bias_by_layer = to_cpu(counts_by_layer), to_cpu(bias_by_layer)
    out: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {k: [] for k in _WORST}
    for i, counts in counts_by_layer.items():
        for k, v in layer_load_metrics(counts, ep).items():
            out[f"moe/{k}/layer_{i}"] = v
            per_metric[k].append(v)
    for k, values in per_metric.items():
        if values:
            out[f"moe/{k}"] = _WORST[k](values)
    if bias_by_layer:
        out["moe/expert_bias_absmax"] = max(b.abs().max().item() for b in bias_by_layer.values())
    return out
