"""Row permutations for the all-to-all dispatcher whose backward passes are gathers, not scatter-adds.

`index_select`'s backward is an `index_add` (atomic adds, in bf16 on the GPU). When the indices are a
permutation, or a permutation of the (token, slot) assignments of dropless top-k routing, the backward
is another gather by the inverse permutation (plus a sum over the K slots of a token): no atomics,
each row read and written once. On CUDA the two reductions over a token's K rows (the combine and the
dispatch gather's backward) are single-pass Triton kernels (moe.kernels.row_combine) instead of a
gather followed by a reduction.
"""
from __future__ import annotations

import torch

ROW_KERNELS = "auto"
"""`auto`: the Triton row kernels on CUDA, torch elsewhere; `on` forces them (tests, under
TRITON_INTERPRET=1 on CPU); `off` keeps torch everywhere (benchmarks compare both)."""


def _row_kernels(t: torch.Tensor) -> bool:
    return ROW_KERNELS == "on" or (ROW_KERNELS == "auto" and t.is_cuda)


def inverse_permutation(perm_S: torch.Tensor) -> torch.Tensor:
    inv_S = torch.empty_like(perm_S)
    inv_S[perm_S] = torch.arange(perm_S.numel(), device=perm_S.device, dtype=perm_S.dtype)
    return inv_S


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD: torch.Tensor, perm_S: torch.Tensor, inv_S: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv_S)
        return x_SD.index_select(0, perm_S)

    @staticmethod
    def backward(ctx, g_SD: torch.Tensor):
        (inv_S,) = ctx.saved_tensors
        return g_SD.index_select(0, inv_S), None, None


def permute_rows(x_SD: torch.Tensor, perm_S: torch.Tensor, inv_S: torch.Tensor) -> torch.Tensor:
    """`x_SD[perm_S]` where `inv_S` is the inverse permutation of `perm_S`."""
    return _PermuteRows.apply(x_SD, perm_S, inv_S)


class _GatherAssignments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, assign_S: torch.Tensor, inv_S: torch.Tensor, K: int) -> torch.Tensor:
        ctx.save_for_backward(inv_S)
        ctx.K = K
        return x_TD.index_select(0, assign_S // K)

    @staticmethod
    def backward(ctx, g_SD: torch.Tensor):
        (inv_S,) = ctx.saved_tensors
        if _row_kernels(g_SD):
            from moe.kernels.row_combine import gather_reduce

            return gather_reduce(g_SD, inv_S.view(-1, ctx.K), None, g_SD.dtype), None, None, None
        g_TKD = g_SD.index_select(0, inv_S).view(-1, ctx.K, g_SD.shape[-1])
        acc = torch.promote_types(g_SD.dtype, torch.float32)  # bf16 gradients summed in fp32
        return g_TKD.sum(1, dtype=acc).to(g_SD.dtype), None, None, None


def gather_assignments(x_TD: torch.Tensor, assign_S: torch.Tensor, inv_S: torch.Tensor, K: int) -> torch.Tensor:
    """Row `assign_S[s] // K` of `x_TD` for every assignment s, where `assign_S` orders all T*K
    (token, slot) pairs (dropless routing) and `inv_S` is its inverse."""
    return _GatherAssignments.apply(x_TD, assign_S, inv_S, K)


class _CombineKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SD: torch.Tensor, pos_TK: torch.Tensor, gate_TK: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
        from moe.kernels.row_combine import gather_reduce

        ctx.save_for_backward(y_SD, pos_TK, gate_TK)
        return gather_reduce(y_SD, pos_TK, gate_TK, out_dtype)

    @staticmethod
    def backward(ctx, dout_TD: torch.Tensor):
        from moe.kernels.row_combine import combine_backward

        y_SD, pos_TK, gate_TK = ctx.saved_tensors
        dy_SD, dgate_TK = combine_backward(dout_TD, y_SD, pos_TK, gate_TK)
        return dy_SD, None, dgate_TK.to(gate_TK.dtype), None


def combine_assignments(y_SD: torch.Tensor, assign_S: torch.Tensor, inv_S: torch.Tensor,
                        gate_TK: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_k gate[t, k] * y[row of (t, k)] with fp32 accumulation, as `out_dtype` (y's by default),
    instead of a gate multiply and an atomic scatter-add. On CUDA one kernel reads each row once; the
    torch path gathers back to (token, slot) order and does one batched matmul per token."""
    T, K = gate_TK.shape
    out_dtype = out_dtype or y_SD.dtype
    if _row_kernels(y_SD):
        return _CombineKernel.apply(y_SD, inv_S.view(T, K), gate_TK, out_dtype)
    y_TKD = permute_rows(y_SD, inv_S, assign_S).view(T, K, y_SD.shape[-1])
    return torch.bmm(gate_TK.unsqueeze(1).to(y_TKD.dtype), y_TKD).squeeze(1).to(out_dtype)
