"""The MoE block: router -> dispatch -> routed experts -> combine, plus shared experts."""
from __future__ import annotations

import torch
import torch.nn as nn

from moe.config import ModelConfig
from moe.model.balancing import expert_counts
from moe.model.dispatch import GroupedExperts, LocalDispatcher
from moe.model.layers import SwiGLU
from moe.model.router import Router, RouterOutput
from moe.train.timing import RegionTimer, run_timed


def balanced_routing(routed: RouterOutput, num_experts: int) -> RouterOutput:
    """Round-robin replacement of the router's choices with the same shapes: assignment n = t*K + j
    (token t, slot j) goes to expert n mod E, so every expert gets T*K/E assignments (+-1) and a
    token's K experts are distinct (K <= E). The gate weights stay the router's (so the router
    still gets gradients and the combine does the same work); nothing is dropped.

    It exists for the balanced-vs-real A/B (`train.force_balanced_routing`): the model learns less
    well with it, but the step does exactly the work of a perfectly balanced router."""
    T, K = routed.expert_idx_TK.shape
    device = routed.expert_idx_TK.device
    expert_idx_TK = (torch.arange(T * K, device=device) % num_experts).view(T, K)
    keep_TK = torch.ones_like(expert_idx_TK, dtype=torch.bool)
    tokens_per_expert_E = expert_counts(expert_idx_TK, num_experts)  # no host sync (train.cuda_graphs)
    metrics = {**routed.metrics, "dropped": torch.zeros((), dtype=torch.int64, device=device)}
    return RouterOutput(expert_idx_TK, routed.gate_TK, keep_TK, tokens_per_expert_E, routed.aux_loss, metrics)


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
        self.force_balanced_routing = False
        """Replace the router's choices by `balanced_routing` (the trainer sets it from the config)."""
        self.timer: RegionTimer | None = None
        """Set by the trainer when timing is on; with the local dispatcher the whole dispatch (gather,
        experts, weighted scatter) is the `experts` region (expert-parallel dispatchers time themselves)."""
        self.layer_id = -1
        """This block's layer index, for timing region names (set by the trainer)."""

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routed = self.router(x_TD, S)
        if self.force_balanced_routing:
            routed = balanced_routing(routed, self.num_experts)
        self.aux_loss = routed.aux_loss
        self.metrics = {**routed.metrics,
                        "dropped_fraction": routed.metrics["dropped"].float()
                        / max(routed.keep_TK.numel() * self.router.seq_shards, 1)}
        with torch.no_grad():
            self.tokens_per_expert_acc += routed.tokens_per_expert_E.to(self.tokens_per_expert_acc.device)
        # Dropless routing keeps everything: say so, and the dispatcher skips a host-syncing nonzero().
        keep_TK = routed.keep_TK if self.router.cfg.capacity_factor > 0 else None

        # On [B, S, D]: tensor parallelism gathers the sequence dim for the shared experts.
        shared = (lambda: self.shared(x_BSD).reshape(B * S, D)) if self.shared is not None else None
        if isinstance(self.dispatcher, LocalDispatcher):  # the EP dispatcher times its own regions
            out_TD = run_timed(self.timer, f"experts/layer_{self.layer_id}", x_TD, lambda x: self.dispatcher.run(
                x, routed.expert_idx_TK, routed.gate_TK, keep_TK, self.experts)).to(x_BSD.dtype)
            if shared is not None:
                out_TD = out_TD + shared()
        else:
            # The shared experts do not depend on the dispatch: the dispatcher runs them while its
            # communication is in flight (and adds them to its output, in the same order as above).
            out_TD = self.dispatcher.run(x_TD, routed.expert_idx_TK, routed.gate_TK, keep_TK, self.experts,
                                         meanwhile=shared)
        return out_TD.view(B, S, D)
