"""Memory-bound row kernels of the all-to-all dispatcher's combine (moe.parallel.permute).

With dropless top-k routing every token t has K result rows somewhere in a buffer `y_SD` (at positions
`pos_TK[t, k]`). The torch path gathers them into (token, slot) order and then reduces: it writes and
reads all S = T*K rows an extra time. These kernels read each row once:

    gather_reduce      out_TD[t] = sum_k w_TK[t, k] * y_SD[pos_TK[t, k]]    (w = 1 when absent)
                       the combine's forward (w = gate) and the dispatch gather's backward (w = 1)
    combine_backward   dy_SD[pos_TK[t, k]] = gate_TK[t, k] * dout_TD[t]
                       dgate_TK[t, k] = <dout_TD[t], y_SD[pos_TK[t, k]]>

    segment_sum        out_ND[n] = sum_{j in [off[n], off[n+1])} y_SD[perm_S[j]]
                       rows grouped by destination with any number per destination: the Triton
                       experts' deterministic combine (`token_segments` builds perm and off)

Sums run in fp32, in a fixed order, so results are bitwise reproducible. One program per (output
row, block of D), so any hidden size works.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels._tiles import INTERPRET

_BD = 64 if INTERPRET else 1024  # the interpreter runs programs one by one: keep its blocks small


@triton.jit
def _gather_reduce_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, D, K: tl.constexpr, HAS_W: tl.constexpr,
                          BD: tl.constexpr):
    t = tl.program_id(0)
    d0 = tl.program_id(1) * BD
    offs = d0 + tl.arange(0, BD)
    mask = offs < D
    acc = tl.zeros([BD], dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(pos_ptr + t * K + k).to(tl.int64)
        v = tl.load(y_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * K + k).to(tl.float32)
        acc += v
    tl.store(out_ptr + t.to(tl.int64) * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_backward_kernel(dout_ptr, y_ptr, pos_ptr, gate_ptr, dy_ptr, dgate_part_ptr, D, NB,
                             K: tl.constexpr, BD: tl.constexpr):
    # One program per (token, block of D): dout's block is read once for all K rows; the gate gradient
    # leaves as per-block partial dots, summed by the caller (deterministic, no atomics).
    t = tl.program_id(0)
    b = tl.program_id(1)
    offs = b * BD + tl.arange(0, BD)
    mask = offs < D
    dout = tl.load(dout_ptr + t.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        row = tl.load(pos_ptr + t * K + k).to(tl.int64)
        g = tl.load(gate_ptr + t * K + k).to(tl.float32)
        y = tl.load(y_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dy_ptr + row * D + offs, (g * dout).to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dgate_part_ptr + (t * K + k) * NB + b, tl.sum(dout * y, axis=0))


@triton.jit
def _segment_sum_kernel(y_ptr, perm_ptr, off_ptr, out_ptr, D, BD: tl.constexpr):
    n = tl.program_id(0)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = offs < D
    acc = tl.zeros([BD], dtype=tl.float32)
    for j in range(tl.load(off_ptr + n), tl.load(off_ptr + n + 1)):
        row = tl.load(perm_ptr + j).to(tl.int64)
        acc += tl.load(y_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n.to(tl.int64) * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def token_segments(dest_S: torch.Tensor, num_dest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm_S, off_N1): the rows of each destination `n < num_dest`, as `perm_S[off_N1[n]:off_N1[n+1]]`.

    A stable sort, so each destination's rows keep their order and the sums their order; no host sync.
    Three launches (sort, arange, searchsorted): on small layers their host time is what this costs.
    """
    sorted_S, perm_S = torch.sort(dest_S, stable=True)
    first_N1 = torch.arange(num_dest + 1, dtype=sorted_S.dtype, device=dest_S.device)
    return perm_S, torch.searchsorted(sorted_S, first_N1, out_int32=True)


def segment_sum(y_SD: torch.Tensor, perm_S: torch.Tensor, off_N1: torch.Tensor, num_rows: int,
                out_dtype: torch.dtype) -> torch.Tensor:
    """`out[n] = sum of y_SD[perm_S[off_N1[n]:off_N1[n+1]]]` for n < num_rows (fp32 sums; rows with no
    segment, or an empty one, are zero). `off_N1` may describe more destinations than `num_rows`."""
    if off_N1.numel() < num_rows + 1:
        raise ValueError(f"segment_sum: {off_N1.numel() - 1} segments described, {num_rows} rows asked for")
    D = y_SD.shape[-1]
    out_ND = torch.empty(num_rows, D, dtype=out_dtype, device=y_SD.device)
    if num_rows == 0 or D == 0:
        return out_ND
    _segment_sum_kernel[(num_rows, triton.cdiv(D, _BD))](y_SD, perm_S, off_N1, out_ND, D, BD=_BD)
    return out_ND


def gather_reduce(y_SD: torch.Tensor, pos_TK: torch.Tensor, w_TK: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """`sum_k w_TK[t, k] * y_SD[pos_TK[t, k]]` for every t, accumulated in fp32, as `out_dtype`."""
    T, K = pos_TK.shape
    D = y_SD.shape[-1]
    out_TD = torch.empty(T, D, dtype=out_dtype, device=y_SD.device)
    if T == 0 or D == 0:
        return out_TD
    w = w_TK.contiguous() if w_TK is not None else pos_TK
    _gather_reduce_kernel[(T, triton.cdiv(D, _BD))](
        y_SD.contiguous(), pos_TK.contiguous(), w, out_TD, D, K=K, HAS_W=w_TK is not None, BD=_BD)
    return out_TD


def combine_backward(dout_TD: torch.Tensor, y_SD: torch.Tensor, pos_TK: torch.Tensor, gate_TK: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy_SD in y's dtype, dgate_TK in fp32) of `gather_reduce(y_SD, pos_TK, gate_TK)`; `pos_TK` must be
    a permutation of y's rows (every row written once)."""
    T, K = pos_TK.shape
    D = y_SD.shape[-1]
    dy_SD = torch.empty_like(y_SD)
    NB = triton.cdiv(D, _BD)
    dgate_part_TKB = torch.empty(T, K, NB, dtype=torch.float32, device=y_SD.device)
    if T == 0 or D == 0:
        return dy_SD, dgate_part_TKB.sum(-1)
    _combine_backward_kernel[(T, NB)](dout_TD.contiguous(), y_SD.contiguous(), pos_TK.contiguous(),
                                      gate_TK.contiguous(), dy_SD, dgate_part_TKB, D, NB, K=K, BD=_BD)
    return dy_SD, dgate_part_TKB.sum(-1)
