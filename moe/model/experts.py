"""Routed expert FFN over tokens grouped by expert: one interface, several backends.

Every backend computes, for each expert e and each of its rows s,
    y_s = (silu(x_s @ w_gate[e]) * (x_s @ w_up[e])) @ w_down[e]
with the rows of expert e contiguous (experts in order 0..E-1, `tokens_per_expert_E[e]` rows each).

Two input modes share one signature so that the fused kernel can skip the permuted copy:
- `row_idx_S is None`: the first S rows of `x` are already grouped by expert; the result has S rows
  (scaled by `gate_S` when given).
- `row_idx_S` given: row s reads `x[row_idx_S[s]]` (a gather), and the result is `out` of
  `num_out_rows` rows with `gate_S[s] * y_s` added at row `row_idx_S[s]` (a weighted scatter).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "grouped_mm", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` means the Triton kernel on CUDA and the plain torch loop on CPU."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"model.moe.backend={backend!r} is not one of {('auto',) + BACKENDS}")
    if backend == "grouped_mm" and (device.type != "cuda" or not hasattr(torch, "_grouped_mm")):
        raise ValueError("model.moe.backend=grouped_mm needs CUDA and torch._grouped_mm; use torch on CPU")
    return backend


def _gather_scatter(
    per_row_fn,
    x: torch.Tensor,
    row_idx_S: torch.Tensor | None,
    gate_S: torch.Tensor | None,
    num_out_rows: int | None,
) -> torch.Tensor:
    """Shared gather -> grouped FFN -> weighted scatter wrapper for the unfused backends."""
    x_SD = x if row_idx_S is None else x.index_select(0, row_idx_S)
    y_SD = per_row_fn(x_SD)
    if gate_S is not None:
        y_SD = y_SD * gate_S.to(y_SD.dtype).unsqueeze(-1)
    if row_idx_S is None:
        return y_SD
    rows = x.shape[0] if num_out_rows is None else num_out_rows
    out = y_SD.new_zeros(rows, y_SD.shape[-1])
    return out.index_add(0, row_idx_S, y_SD)


def _torch_loop(x_SD, w_gate_EDF, w_up_EDF, w_down_EFD, tokens_per_expert_E) -> torch.Tensor:
    """Reference: one small matmul chain per expert. Slow, obviously correct."""
    counts = tokens_per_expert_E.tolist()
    total = sum(counts)
    outs = []
    start = 0
    for e, n in enumerate(counts):
        x_nD = x_SD[start : start + n]
        h_nF = F.silu(x_nD @ w_gate_EDF[e]) * (x_nD @ w_up_EDF[e])
        outs.append(h_nF @ w_down_EFD[e])
        start += n
    y = torch.cat(outs, 0) if outs else x_SD.new_zeros(0, w_down_EFD.shape[-1])
    if total < x_SD.shape[0]:  # rows past the counted ones (padding) produce zeros
        y = torch.cat([y, y.new_zeros(x_SD.shape[0] - total, y.shape[-1])], 0)
    # Keep idle experts in the graph so their gradient is an exact zero, not None.
    idle = (w_gate_EDF.sum() + w_up_EDF.sum() + w_down_EFD.sum()) * 0.0
    return y + idle.to(y.dtype)


def _grouped_mm(x_SD, w_gate_EDF, w_up_EDF, w_down_EFD, tokens_per_expert_E) -> torch.Tensor:
    """torch._grouped_mm pipeline (CUDA, bf16): int32 cumulative offsets select each expert's rows."""
    offs_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
    dtype = torch.bfloat16
    xb = x_SD.to(dtype)
    gate = torch._grouped_mm(xb, w_gate_EDF.to(dtype), offs=offs_E)
    up = torch._grouped_mm(xb, w_up_EDF.to(dtype), offs=offs_E)
    y = torch._grouped_mm(F.silu(gate) * up, w_down_EFD.to(dtype), offs=offs_E)
    return y.to(x_SD.dtype)


def routed_experts(
    x: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    row_idx_S: torch.Tensor | None = None,
    gate_S: torch.Tensor | None = None,
    num_out_rows: int | None = None,
    backend: str = "torch",
    out: torch.Tensor | None = None,
    grad_x_out: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Apply each expert's SwiGLU FFN to its rows; see the module docstring for the two modes.

    `out` / `grad_x_out(rows)`: where the result and the gradient of x may be written (hints, honoured
    by the triton backend without `row_idx_S`; callers check where the result landed)."""
    if backend == "triton":
        from moe.kernels import triton_routed_experts

        return triton_routed_experts(
            x, w_gate_EDF, w_up_EDF, w_down_EFD, tokens_per_expert_E, row_idx_S, gate_S, num_out_rows, out, grad_x_out
        )
    fn = _grouped_mm if backend == "grouped_mm" else _torch_loop

    def per_row(x_SD: torch.Tensor) -> torch.Tensor:
        return fn(x_SD, w_gate_EDF, w_up_EDF, w_down_EFD, tokens_per_expert_E)

    return _gather_scatter(per_row, x, row_idx_S, gate_S, num_out_rows)
