"""Exact all-to-all traffic from the dispatchers' split sizes, and how far tokens spread."""
from __future__ import annotations

from typing import Any

import torch

from moe.parallel.mesh import ParallelContext


def expected_uniform_bytes(tokens: int, top_k: int, ep: int, hidden: int, bytes_per_elem: int) -> float:
    """One rank's dispatch bytes for one layer under uniform routing: tokens*k*(1-1/ep)*hidden*bytes."""
    return tokens * top_k * (1 - 1 / ep) * hidden * bytes_per_elem


def traffic_metrics(model: torch.nn.Module, ctx: ParallelContext, tokens_per_rank: int, top_k: int,
                    hidden: int) -> dict[str, Any]:
    """Per MoE layer and summed: this rank's dispatch/combine bytes, split intra/inter node, the EP
    group's rank x rank matrix of token vectors, and the uniform-routing expectation. Resets the records."""
    out: dict[str, Any] = {}
    totals = {"dispatch": 0, "intra": 0, "inter": 0, "expected": 0.0, "routed_inter": 0}
    ep_ranks = ctx.group_ranks("ep")
    nodes = torch.tensor([ctx.node_of_rank[r] for r in ep_ranks])
    same_node_RR = nodes.unsqueeze(0) == nodes.unsqueeze(1)
    me = ctx.ep_rank
    for i, moe in model.moe_layers().items():
        rec = getattr(moe.dispatcher, "traffic", None)
        if rec is None:
            continue
        m = rec.matrix_RR
        off_diag = m[me].clone()
        off_diag[me] = 0
        sent = int(off_diag.sum()) * rec.bytes_per_row
        intra = int(off_diag[same_node_RR[me]].sum()) * rec.bytes_per_row
        expected = expected_uniform_bytes(tokens_per_rank, top_k, ctx.ep, hidden, rec.bytes_per_row // hidden)
        out[f"traffic/dispatch_bytes/layer_{i}"] = sent
        out[f"traffic/inter_node_bytes/layer_{i}"] = 2 * (sent - intra)  # dispatch + combine
        out[f"traffic/matrix/layer_{i}"] = m.tolist()
        totals["dispatch"] += sent
        totals["intra"] += intra
        totals["inter"] += sent - intra
        totals["expected"] += expected
        totals["routed_inter"] += int(moe.dispatcher.routed_inter_node_rows) * rec.bytes_per_row
        moe.dispatcher.traffic = None
    # The combine returns every row the dispatch sent, so its bytes equal the dispatch's.
    out.update({
        "traffic/dispatch_bytes": totals["dispatch"], "traffic/combine_bytes": totals["dispatch"],
        "traffic/intra_node_bytes": 2 * totals["intra"], "traffic/inter_node_bytes": 2 * totals["inter"],
        "traffic/expected_bytes_uniform": totals["expected"],
        # The same inter-node bytes counted from the routing decisions (expert -> rank -> node) instead
        # of the split sizes: the two must agree exactly.
        "traffic/inter_node_bytes_from_routing": 2 * totals["routed_inter"],
    })
    return out


def routing_spread_metrics(model: torch.nn.Module) -> dict[str, float]:
    """Mean and max distinct EP ranks and nodes per token, over the step, worst layer for the max."""
    out: dict[str, float] = {}
    for key in ("ranks", "nodes"):
        means, maxes = [], []
        for moe in model.moe_layers().values():
            d = moe.dispatcher
            if getattr(d, "spread_tokens", 0):
                means.append(float(d.spread_sum[key]) / d.spread_tokens)
                maxes.append(int(d.spread_max[key]))
        if means:
            out[f"moe/{key}_per_token_mean"] = sum(means) / len(means)
            out[f"moe/{key}_per_token_max"] = max(maxes)
    for moe in model.moe_layers().values():
        d = moe.dispatcher
        if hasattr(d, "spread_tokens"):
            traffic = d.traffic
            d.reset_stats()
            d.traffic = traffic
    return out
