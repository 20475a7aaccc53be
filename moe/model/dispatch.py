"""Token dispatch: turn router choices into rows grouped by expert, and the results back into tokens.

`LocalDispatcher` is the ep=1 case: every expert is on this rank, so dispatch is a sort and combine
is a weighted scatter-add (fused into the expert call where the backend can). The all-to-all
dispatcher for expert parallelism implements the same `run` contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moe.model.experts import routed_experts


@dataclass
class DispatchPlan:
    """Kept (token, expert) assignments sorted by expert."""

    row_idx_S: torch.Tensor
    """Token row of each assignment, expert-major order."""
    gate_S: torch.Tensor
    """Gate weight of each assignment."""
    tokens_per_expert_E: torch.Tensor
    """Assignments per expert (int64)."""
    assign_S: torch.Tensor | None = None
    """Flat (token * K + slot) index of each assignment; with dropless routing a permutation of T*K."""


def plan_local(expert_idx_TK: torch.Tensor, gate_TK: torch.Tensor, keep_TK: torch.Tensor | None,
               num_experts: int) -> DispatchPlan:
    """`keep_TK=None` means dropless: every assignment is kept, and no host sync is needed."""
    K = expert_idx_TK.shape[1]
    flat_expert = expert_idx_TK.reshape(-1)
    kept = None if keep_TK is None else keep_TK.reshape(-1).nonzero().squeeze(-1)
    kept_expert = flat_expert if kept is None else flat_expert[kept]
    # A stable sort keeps token order inside each expert, so results are deterministic.
    order = torch.sort(kept_expert, stable=True).indices
    assign_S = order if kept is None else kept[order]
    # scatter_add rather than bincount: bincount reads the max back to the host on CUDA.
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_expert.device)
    counts_E.scatter_add_(0, kept_expert, torch.ones_like(kept_expert))
    return DispatchPlan(row_idx_S=assign_S // K, gate_S=gate_TK.reshape(-1)[assign_S], tokens_per_expert_E=counts_E,
                        assign_S=assign_S)


class LocalDispatcher:
    """All experts on this rank."""

    def run(
        self,
        x_TD: torch.Tensor,
        expert_idx_TK: torch.Tensor,
        gate_TK: torch.Tensor,
        keep_TK: torch.Tensor | None,
        experts: "torch.nn.Module",
    ) -> torch.Tensor:
        plan = plan_local(expert_idx_TK, gate_TK, keep_TK, experts.num_experts)
        return experts(x_TD, plan.tokens_per_expert_E, plan.row_idx_S, plan.gate_S, x_TD.shape[0])


class GroupedExperts(torch.nn.Module):
    """Routed experts' SwiGLU weights stacked along a leading expert dimension."""

    def __init__(self, num_experts: int, dim: int, hidden: int, backend: str = "torch") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.backend = backend
        self.w_gate_EDF = torch.nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_up_EDF = torch.nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_down_EFD = torch.nn.Parameter(torch.empty(num_experts, hidden, dim))

    @property
    def gathers_rows(self) -> bool:
        """Whether the backend reads its input rows by index and writes results by index inside its own
        kernels: the all-to-all dispatcher then hands it the regroup permutation instead of a copy."""
        return self.backend == "triton"

    def forward(
        self,
        x: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        row_idx_S: torch.Tensor | None = None,
        gate_S: torch.Tensor | None = None,
        num_out_rows: int | None = None,
        out: torch.Tensor | None = None,
        grad_x_out: Callable[[int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return routed_experts(
            x, self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD, tokens_per_expert_E,
            row_idx_S, gate_S, num_out_rows, backend=self.backend, out=out, grad_x_out=grad_x_out,
        )
