"""Forward kernels of the grouped SwiGLU experts.

Both are persistent grouped GEMMs over row tiles of all experts in one launch:
- `gate_up_fwd`: g = x_rows @ w_gate[e], u = x_rows @ w_up[e] in one tile loop (the x tile is loaded once
  for both), h = silu(g) * u in the epilogue (times the row's gate weight with GATE_H). In gather mode
  the x rows are read through `row_idx`, so no permuted copy of the activations is made.
- `down_fwd`: y = h @ w_down[e], times the gate weight in the epilogue, stored per sorted row (SCATTER
  off: pre-grouped inputs, or gather mode with MOE_TRITON_SCATTER=combine, which sums each token's
  rows afterwards) or atomically added to the token's output row (SCATTER: the scatter-add is fused
  into the epilogue).

With TMA (Hopper and later; see `_tiles.TMA_MODE`) the weight tiles, the contiguous h rows of the
down projection and pre-grouped x rows (X_DESC) come through tensor descriptors: the copy engine
fetches them, so no registers hold their addresses and the K and column tails come back zero-filled
without masks. Gathered rows stay on pointer loads (Hopper's TMA has no row gather). Row tiles stored
per sorted row may go out through a descriptor too (`_tiles.store_rows`, config key ST, autotuned
against pointer stores).
"""
from __future__ import annotations

import triton
import triton.language as tl

from moe.kernels._tiles import (
    expert_blocks, locate_tile, smem_prune, store_rows, tile_configs, tma_on, tma_on_without_scatter, zero_tail_rows,
)


# Lists chosen by MOE_TRITON_TUNE=wide on an H100, and on an H200 with TMA, over the four benchmark
# shapes (BENCHMARKS.md).
@triton.autotune(
    configs=tile_configs(
        [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3)],
        wide=[(128, 64, 64, 8, 4), (128, 64, 64, 4, 3, 2), (64, 128, 64, 4, 3, 2), (64, 128, 64, 4, 4, 1),
              (64, 256, 64, 8, 4, 1), (128, 128, 64, 8, 5)], persistent=True, tma_store=True,
    ),
    key=["D", "F", "GATHER", "TMA", "X_DESC"],
    prune_configs_by={"early_config_prune": smem_prune("x_ptr", 2, stores_on=tma_on)},
)
@triton.jit
def gate_up_fwd(
    x_ptr, row_idx_ptr, wg_ptr, wu_ptr, counts_ptr, h_ptr, g_ptr, u_ptr, gate_ptr,
    E, D, F, S,
    GATHER: tl.constexpr, SAVE_GU: tl.constexpr, GATE_H: tl.constexpr, E_POW2: tl.constexpr,
    DOT_PREC: tl.constexpr, TMA: tl.constexpr, X_DESC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PPS: tl.constexpr,
    ST: tl.constexpr,
):
    if TMA:
        wg_desc = tl.make_tensor_descriptor(wg_ptr, [E, D, F], [D * F, F, 1], [1, BK, BN])
        wu_desc = tl.make_tensor_descriptor(wu_ptr, [E, D, F], [D * F, F, 1], [1, BK, BN])
    if X_DESC:  # pre-grouped x rows (never gathered ones)
        x_desc = tl.make_tensor_descriptor(x_ptr, [S, D], [D, 1], [BM, BK])
    use_desc: tl.constexpr = TMA and ST
    if use_desc:
        h_desc = tl.make_tensor_descriptor(h_ptr, [S, F], [F, 1], [BM, BN])
        g_desc = tl.make_tensor_descriptor(g_ptr, [S, F], [F, 1], [BM, BN])
        u_desc = tl.make_tensor_descriptor(u_ptr, [S, F], [F, 1], [BM, BN])
    else:  # stand-ins; store_rows reads them only with USE_DESC
        h_desc = h_ptr
        g_desc = g_ptr
        u_desc = u_ptr
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    e_idx, cnt, nblk, blk_end, row_end = expert_blocks(counts_ptr, E, E_POW2, BM)
    num_m = tl.sum(nblk, 0)
    num_n = tl.cdiv(F, BN)
    for tile in range(pid, num_m * num_n, nprog):
        e, m_start, m_end, pid_n = locate_tile(tile, num_n, e_idx, cnt, nblk, blk_end, row_end, BM, GROUP_M)
        offs_m = m_start + tl.arange(0, BM)
        row_ok = offs_m < m_end
        # Rows past the expert's end read a valid row instead of being masked: the loads stay unmasked
        # along M and the extra results are dropped at the store.
        if GATHER:
            src = tl.load(row_idx_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        else:
            src = tl.where(row_ok, offs_m, m_start).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_nw = offs_n % F  # in-bounds weight columns; columns >= F are dropped at the store
        offs_k = tl.arange(0, BK)
        a_ptrs = x_ptr + src[:, None] * D + offs_k[None, :]
        if not TMA:
            w_base = e.to(tl.int64) * D * F
            bg_ptrs = wg_ptr + w_base + offs_k[:, None] * F + offs_nw[None, :]
            bu_ptrs = wu_ptr + w_base + offs_k[:, None] * F + offs_nw[None, :]
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(D, BK)):
            k_ok = offs_k < D - k * BK
            if X_DESC:  # rows past the expert's end come from the next one and are dropped at the store
                a = x_desc.load([m_start, k * BK])
            else:
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            if TMA:
                bg = wg_desc.load([e, k * BK, pid_n * BN]).reshape(BK, BN)
                bu = wu_desc.load([e, k * BK, pid_n * BN]).reshape(BK, BN)
            else:
                bg = tl.load(bg_ptrs, mask=k_ok[:, None], other=0.0)
                bu = tl.load(bu_ptrs, mask=k_ok[:, None], other=0.0)
                bg_ptrs += BK * F
                bu_ptrs += BK * F
            acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PREC)
            a_ptrs += BK
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        if GATE_H:  # for `down_ws`, whose kernel takes no gate; g and u stay unscaled for the backward
            h = h * tl.load(gate_ptr + offs_m, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        store_rows(h_ptr, h_desc, h, m_start, m_end, pid_n, F, BM, BN, use_desc)
        if SAVE_GU:  # the pre-activations are all the backward needs; h is recomputed from them
            store_rows(g_ptr, g_desc, acc_g, m_start, m_end, pid_n, F, BM, BN, use_desc)
            store_rows(u_ptr, u_desc, acc_u, m_start, m_end, pid_n, F, BM, BN, use_desc)


@triton.autotune(
    configs=tile_configs(
        [(128, 256, 64, 8, 3), (64, 128, 64, 4, 3, 2), (128, 128, 64, 8, 4)],
        wide=[(64, 128, 64, 4, 4), (64, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1), (64, 256, 64, 8, 4, 1),
              (128, 256, 64, 8, 4)], persistent=True, tma_store=True,
    ),
    key=["D", "F", "SCATTER", "TMA"], reset_to_zero=["out_ptr"],
    prune_configs_by={"early_config_prune": smem_prune("h_ptr", 1, stores_on=tma_on_without_scatter)},
)
@triton.jit
def down_fwd(
    h_ptr, wd_ptr, gate_ptr, row_idx_ptr, counts_ptr, out_ptr,
    E, D, F, S, out_rows,
    SCATTER: tl.constexpr, HAS_GATE: tl.constexpr, E_POW2: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PPS: tl.constexpr,
    ST: tl.constexpr,
):
    if TMA:
        h_desc = tl.make_tensor_descriptor(h_ptr, [S, F], [F, 1], [BM, BK])
        wd_desc = tl.make_tensor_descriptor(wd_ptr, [E, F, D], [F * D, D, 1], [1, BK, BN])
    use_desc: tl.constexpr = TMA and ST and not SCATTER
    if use_desc:
        out_desc = tl.make_tensor_descriptor(out_ptr, [out_rows, D], [D, 1], [BM, BN])
    else:
        out_desc = out_ptr
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    e_idx, cnt, nblk, blk_end, row_end = expert_blocks(counts_ptr, E, E_POW2, BM)
    num_m = tl.sum(nblk, 0)
    num_n = tl.cdiv(D, BN)
    for tile in range(pid, num_m * num_n, nprog):
        e, m_start, m_end, pid_n = locate_tile(tile, num_n, e_idx, cnt, nblk, blk_end, row_end, BM, GROUP_M)
        offs_m = m_start + tl.arange(0, BM)
        row_ok = offs_m < m_end
        rows = tl.where(row_ok, offs_m, m_start).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_nw = offs_n % D
        offs_k = tl.arange(0, BK)
        if not TMA:
            a_ptrs = h_ptr + rows[:, None] * F + offs_k[None, :]
            b_ptrs = wd_ptr + e.to(tl.int64) * F * D + offs_k[:, None] * D + offs_nw[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(F, BK)):
            if TMA:
                # Rows of the tile past its expert's end belong to the next expert: their results are
                # dropped at the store, and a row's output depends on that row alone.
                a = h_desc.load([m_start, k * BK])
                b = wd_desc.load([e, k * BK, pid_n * BN]).reshape(BK, BN)
            else:
                k_ok = offs_k < F - k * BK
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
                a_ptrs += BK
                b_ptrs += BK * D
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        if HAS_GATE:
            gate = tl.load(gate_ptr + offs_m, mask=row_ok, other=0.0).to(tl.float32)
            acc = acc * gate[:, None]
        if SCATTER:
            o_mask = row_ok[:, None] & (offs_n[None, :] < D)
            # Several experts add into one token row: atomics, in the buffer's dtype (see grouped_swiglu).
            dst = tl.load(row_idx_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
            tl.atomic_add(
                out_ptr + dst[:, None] * D + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=o_mask,
                sem="relaxed",
            )
        else:
            store_rows(out_ptr, out_desc, acc, m_start, m_end, pid_n, D, BM, BN, use_desc)
    if not SCATTER:
        zero_tail_rows(out_ptr, tl.sum(cnt, 0), out_rows, D, pid, nprog, BM, BN)
