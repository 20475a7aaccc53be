"""Row kernels that read other GPUs' memory directly: the all-to-all of the P2P expert dispatcher.

Every EP rank holds the same symmetric buffers (moe.parallel.peer_dispatch); `*_ptrs_R` are int64 tensors
with each rank's address of one buffer, so a program reads a row of rank s's buffer as a plain load over
NVLink. The gather or the reduction that an NCCL all-to-all needs around it happens in the same pass as
the transfer, so no send buffer is built and no received rows are copied again:

    pull_rows     out[r] = X_s[IDX_s[slot_r]],  s = src_r;  optionally also gate_out[r] = GATE_s[slot_r]
    push_values   V_s[slot_r] = v[r]  (the gate gradients back to the ranks that own the gates)
    pull_reduce   out[t] = sum_k Y_{rank[t, k]}[pos[t, k]]   (pos = -1: a dropped assignment, skipped)

Sums run in fp32. On CPU the same kernels run under TRITON_INTERPRET=1 with the "ranks" being
tensors of one process (the tests), since a pointer is just an address there too.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moe.kernels._tiles import INTERPRET

# Row chunk and warps per program; MOE_PEER_BD / MOE_PEER_WARPS were tried at 1024-4096 and 4-8 on two
# H200s with no difference beyond noise (the transfer, not the kernel, sets the pace).
_BD = 64 if INTERPRET else int(os.environ.get("MOE_PEER_BD", "1024"))
_WARPS = int(os.environ.get("MOE_PEER_WARPS", "4"))
# MOE_PEER_UNROLL=0 walks a pulled row chunk by chunk (the earlier kernel), for comparison.
_UNROLL = os.environ.get("MOE_PEER_UNROLL", "1") == "1"


@triton.jit
def _pull_rows_kernel(x_ptrs, idx_ptrs, gate_ptrs, src_ptr, slot_ptr, out_ptr, gate_out_ptr, D: tl.constexpr,
                      GATE_OUT: tl.constexpr, BD: tl.constexpr, UNROLL: tl.constexpr):
    # One program per received row, walking it in BD chunks. Unrolled (D is a compile-time constant),
    # every chunk's load can be in flight at once instead of one round trip over NVLink per chunk.
    r = tl.program_id(0).to(tl.int64)
    s = tl.load(src_ptr + r)
    slot = tl.load(slot_ptr + r).to(tl.int64)
    idx_base = tl.load(idx_ptrs + s).to(tl.pointer_type(tl.int32))
    tok = tl.load(idx_base + slot).to(tl.int64)
    x_base = tl.load(x_ptrs + s).to(tl.pointer_type(out_ptr.dtype.element_ty))
    if GATE_OUT:
        tl.store(gate_out_ptr + r, tl.load(tl.load(gate_ptrs + s).to(tl.pointer_type(tl.float32)) + slot))
    if UNROLL:
        for d0 in tl.static_range(0, D, BD):
            offs = d0 + tl.arange(0, BD)
            mask = offs < D
            tl.store(out_ptr + r * D + offs, tl.load(x_base + tok * D + offs, mask=mask), mask=mask)
    else:
        for d0 in range(0, D, BD):
            offs = d0 + tl.arange(0, BD)
            mask = offs < D
            tl.store(out_ptr + r * D + offs, tl.load(x_base + tok * D + offs, mask=mask), mask=mask)


@triton.jit
def _push_values_kernel(v_ptrs, src_ptr, slot_ptr, val_ptr, N, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = r < N
    s = tl.load(src_ptr + r, mask=mask, other=0)
    slot = tl.load(slot_ptr + r, mask=mask, other=0).to(tl.int64)
    base = tl.load(v_ptrs + s, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    tl.store(base + slot, tl.load(val_ptr + r, mask=mask, other=0.0).to(tl.float32), mask=mask)


@triton.jit
def _pull_reduce_kernel(y_ptrs, rank_ptr, pos_ptr, like_ptr, out_ptr, D, K: tl.constexpr, BD: tl.constexpr):
    # like_ptr: a tensor of the buffers' dtype, which may differ from the output's (bf16 rows, fp32 sums).
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = offs < D
    acc = tl.zeros([BD], dtype=tl.float32)
    for k in tl.static_range(K):
        p = tl.load(rank_ptr + t * K + k)
        row = tl.load(pos_ptr + t * K + k).to(tl.int64)  # -1: a dropped assignment adds nothing
        base = tl.load(y_ptrs + tl.maximum(p, 0)).to(tl.pointer_type(like_ptr.dtype.element_ty))
        live = mask & ((offs * 0 + row) >= 0)  # as a vector: the interpreter rejects vector & scalar masks
        acc += tl.load(base + row * D + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def pull_rows(x_ptrs_R: torch.Tensor, idx_ptrs_R: torch.Tensor, src_N: torch.Tensor, slot_N: torch.Tensor,
              out_ND: torch.Tensor, gate_ptrs_R: torch.Tensor | None = None,
              gate_out_N: torch.Tensor | None = None) -> torch.Tensor:
    """Fill `out_ND` (its dtype is the buffers' dtype) with rank src[r]'s row IDX[slot[r]]; with
    `gate_ptrs_R`, also `gate_out_N[r]` (fp32) with that rank's GATE[slot[r]]."""
    N, D = out_ND.shape
    if N == 0:
        return out_ND
    gate_out = gate_ptrs_R is not None
    _pull_rows_kernel[(N,)](
        x_ptrs_R, idx_ptrs_R, gate_ptrs_R if gate_out else x_ptrs_R, src_N.contiguous(), slot_N.contiguous(),
        out_ND, gate_out_N if gate_out else out_ND, D, GATE_OUT=gate_out, BD=_BD, UNROLL=_UNROLL, num_warps=_WARPS)
    return out_ND


def push_values(v_ptrs_R: torch.Tensor, src_N: torch.Tensor, slot_N: torch.Tensor, val_N: torch.Tensor) -> None:
    """V[slot[r]] = val[r] on rank src[r], for fp32 buffers V."""
    N = val_N.numel()
    if N == 0:
        return
    _push_values_kernel[(triton.cdiv(N, 1024),)](v_ptrs_R, src_N.contiguous(), slot_N.contiguous(),
                                                 val_N.contiguous(), N, BLOCK=1024)


def pull_reduce(y_ptrs_R: torch.Tensor, buf_dtype: torch.dtype, rank_TK: torch.Tensor, pos_TK: torch.Tensor,
                out_TD: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k (row pos[t, k] of rank rank[t, k]'s buffer of `buf_dtype`), in fp32; pos -1 is skipped."""
    T, K = pos_TK.shape
    D = out_TD.shape[1]
    if T == 0 or D == 0:
        return out_TD
    _pull_reduce_kernel[(T, triton.cdiv(D, _BD))](
        y_ptrs_R, rank_TK.contiguous(), pos_TK.contiguous(), torch.empty(1, dtype=buf_dtype, device=out_TD.device),
        out_TD, D, K=K, BD=_BD, num_warps=_WARPS)
    return out_TD
