"""Forward kernels of the grouped SwiGLU experts.

Both are persistent grouped GEMMs over row tiles of all experts in one launch:
- `gate_up_fwd`: g = x_rows @ w_gate[e], u = x_rows @ w_up[e] in one tile loop (the x tile is loaded once
  for both), h = silu(g) * u in the epilogue. In gather mode the x rows are read through `row_idx`, so no
  permuted copy of the activations is made.
- `down_fwd`: y = h @ w_down[e], times the gate weight in the epilogue, stored in place (pre-grouped) or
  atomically added to the token's output row (gather mode: the scatter-add is fused into the epilogue).

With TMA (Hopper and later; see `_tiles.TMA_MODE`) the weight tiles, and the contiguous h rows of the
down projection, come through tensor descriptors: the copy engine fetches them, so no registers hold
their addresses and the K and column tails come back zero-filled without masks. Gathered rows stay on
pointer loads (Hopper's TMA has no row gather).
"""
from __future__ import annotations

import triton
import triton.language as tl

from moe.kernels._tiles import (
    expert_blocks, locate_block, row_source, rows_times_weight, smem_prune, store_rows, swizzle, tile_configs,
    zero_tail_rows,
)


@triton.jit
def _gate_up_k(x_ptr, src0, src1, wg, wu, e, pid_n, offs_nw, D, F, TWO: tl.constexpr, TMA: tl.constexpr,
               DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """x_rows @ w_gate[e] and x_rows @ w_up[e] for row block `src0` (and `src1` with TWO), one load of
    each x tile for both products and of each weight tile for both row blocks; `wg`/`wu` are
    descriptors under TMA."""
    offs_k = tl.arange(0, BK)
    a0_ptrs = x_ptr + src0[:, None] * D + offs_k[None, :]
    a1_ptrs = x_ptr + src1[:, None] * D + offs_k[None, :]
    if not TMA:
        w_base = e.to(tl.int64) * D * F
        bg_ptrs = wg + w_base + offs_k[:, None] * F + offs_nw[None, :]
        bu_ptrs = wu + w_base + offs_k[:, None] * F + offs_nw[None, :]
    acc_g0 = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u0 = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u1 = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BK)):
        k_ok = offs_k < D - k * BK
        if TMA:
            bg = wg.load([e, k * BK, pid_n * BN]).reshape(BK, BN)
            bu = wu.load([e, k * BK, pid_n * BN]).reshape(BK, BN)
        else:
            bg = tl.load(bg_ptrs, mask=k_ok[:, None], other=0.0)
            bu = tl.load(bu_ptrs, mask=k_ok[:, None], other=0.0)
            bg_ptrs += BK * F
            bu_ptrs += BK * F
        a0 = tl.load(a0_ptrs, mask=k_ok[None, :], other=0.0)
        acc_g0 = tl.dot(a0, bg, acc_g0, input_precision=DOT_PREC)
        acc_u0 = tl.dot(a0, bu, acc_u0, input_precision=DOT_PREC)
        a0_ptrs += BK
        if TWO:
            a1 = tl.load(a1_ptrs, mask=k_ok[None, :], other=0.0)
            acc_g1 = tl.dot(a1, bg, acc_g1, input_precision=DOT_PREC)
            acc_u1 = tl.dot(a1, bu, acc_u1, input_precision=DOT_PREC)
            a1_ptrs += BK
    return acc_g0, acc_u0, acc_g1, acc_u1


@triton.jit
def _gate_up_store(h_ptr, g_ptr, u_ptr, offs_m, row_ok, offs_n, acc_g, acc_u, F, SAVE_GU: tl.constexpr):
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    o_off = offs_m.to(tl.int64)[:, None] * F + offs_n[None, :]
    o_mask = row_ok[:, None] & (offs_n[None, :] < F)
    tl.store(h_ptr + o_off, h.to(h_ptr.dtype.element_ty), mask=o_mask)
    if SAVE_GU:  # the pre-activations are all the backward needs; h is recomputed from them
        tl.store(g_ptr + o_off, acc_g.to(g_ptr.dtype.element_ty), mask=o_mask)
        tl.store(u_ptr + o_off, acc_u.to(u_ptr.dtype.element_ty), mask=o_mask)


# Lists chosen by MOE_TRITON_TUNE=wide on an H100, and on an H200 with TMA, over the four benchmark
# shapes (BENCHMARKS.md). The seventh entry is PAIR (`_tiles.expert_blocks`).
@triton.autotune(
    configs=tile_configs(
        [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
         (128, 64, 64, 8, 4, 1, 1), (128, 64, 64, 8, 3, 1, 1), (64, 128, 64, 8, 4, 1, 1)],
        wide=[(128, 64, 64, 8, 4), (128, 64, 64, 4, 3, 2), (64, 128, 64, 4, 3, 2), (64, 128, 64, 4, 4, 1),
              (64, 256, 64, 8, 4, 1), (128, 128, 64, 8, 5), (64, 64, 64, 4, 4, 2, 1), (128, 64, 32, 8, 5, 1, 1)],
        persistent=True, paired=True,
    ),
    key=["D", "F", "GATHER", "TMA"], prune_configs_by={"early_config_prune": smem_prune("x_ptr", 2)},
)
@triton.jit
def gate_up_fwd(
    x_ptr, row_idx_ptr, wg_ptr, wu_ptr, counts_ptr, h_ptr, g_ptr, u_ptr,
    E, D, F,
    GATHER: tl.constexpr, SAVE_GU: tl.constexpr, E_POW2: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PPS: tl.constexpr,
    PAIR: tl.constexpr,
):
    if TMA:
        wg = tl.make_tensor_descriptor(wg_ptr, [E, D, F], [D * F, F, 1], [1, BK, BN])
        wu = tl.make_tensor_descriptor(wu_ptr, [E, D, F], [D * F, F, 1], [1, BK, BN])
    else:
        wg = wg_ptr
        wu = wu_ptr
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    UNIT: tl.constexpr = 2 * BM if PAIR else BM
    e_idx, cnt, nblk, blk_end, row_end = expert_blocks(counts_ptr, E, E_POW2, UNIT)
    num_m = tl.sum(nblk, 0)
    num_n = tl.cdiv(F, BN)
    for tile in range(pid, num_m * num_n, nprog):
        pid_m, pid_n = swizzle(tile, num_m, num_n, GROUP_M)
        e, m_start, m_end = locate_block(pid_m, e_idx, cnt, nblk, blk_end, row_end, UNIT)
        offs_m = m_start + tl.arange(0, BM)
        row_ok = offs_m < m_end
        src = row_source(row_idx_ptr, offs_m, row_ok, m_start, GATHER)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_nw = offs_n % F  # in-bounds weight columns; columns >= F are dropped at the store
        if PAIR and m_end - m_start > BM:
            offs_m1 = offs_m + BM
            row_ok1 = offs_m1 < m_end
            src1 = row_source(row_idx_ptr, offs_m1, row_ok1, m_start, GATHER)
            acc_g, acc_u, acc_g1, acc_u1 = _gate_up_k(
                x_ptr, src, src1, wg, wu, e, pid_n, offs_nw, D, F, True, TMA, DOT_PREC, BM, BN, BK)
            _gate_up_store(h_ptr, g_ptr, u_ptr, offs_m1, row_ok1, offs_n, acc_g1, acc_u1, F, SAVE_GU)
        else:
            acc_g, acc_u, _, _ = _gate_up_k(
                x_ptr, src, src, wg, wu, e, pid_n, offs_nw, D, F, False, TMA, DOT_PREC, BM, BN, BK)
        _gate_up_store(h_ptr, g_ptr, u_ptr, offs_m, row_ok, offs_n, acc_g, acc_u, F, SAVE_GU)


@triton.autotune(
    configs=tile_configs(
        [(128, 256, 64, 8, 3), (64, 128, 64, 4, 3, 2), (128, 128, 64, 8, 4),
         (128, 128, 64, 8, 3, 1, 1), (128, 128, 64, 8, 4, 1, 1), (64, 256, 64, 8, 3, 1, 1)],
        wide=[(64, 128, 64, 4, 4), (64, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1), (64, 256, 64, 8, 4, 1),
              (128, 256, 64, 8, 4), (64, 128, 64, 4, 4, 1, 1), (128, 64, 64, 4, 4, 2, 1)],
        persistent=True, paired=True,
    ),
    key=["D", "F", "SCATTER", "TMA"], reset_to_zero=["out_ptr"],
    prune_configs_by={"early_config_prune": smem_prune("h_ptr", 1)},
)
@triton.jit
def down_fwd(
    h_ptr, wd_ptr, gate_ptr, row_idx_ptr, counts_ptr, out_ptr,
    E, D, F, S, out_rows,
    SCATTER: tl.constexpr, HAS_GATE: tl.constexpr, E_POW2: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PPS: tl.constexpr,
    PAIR: tl.constexpr,
):
    if TMA:
        # Rows of a tile past its expert's end belong to the next expert: their results are dropped at
        # the store, and a row's output depends on that row alone.
        h = tl.make_tensor_descriptor(h_ptr, [S, F], [F, 1], [BM, BK])
        wd = tl.make_tensor_descriptor(wd_ptr, [E, F, D], [F * D, D, 1], [1, BK, BN])
    else:
        h = h_ptr
        wd = wd_ptr
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    UNIT: tl.constexpr = 2 * BM if PAIR else BM
    e_idx, cnt, nblk, blk_end, row_end = expert_blocks(counts_ptr, E, E_POW2, UNIT)
    num_m = tl.sum(nblk, 0)
    num_n = tl.cdiv(D, BN)
    for tile in range(pid, num_m * num_n, nprog):
        pid_m, pid_n = swizzle(tile, num_m, num_n, GROUP_M)
        e, m_start, m_end = locate_block(pid_m, e_idx, cnt, nblk, blk_end, row_end, UNIT)
        offs_m = m_start + tl.arange(0, BM)
        row_ok = offs_m < m_end
        rows = row_source(row_idx_ptr, offs_m, row_ok, m_start, False)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_nw = offs_n % D
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if PAIR and m_end - m_start > BM:
            offs_m1 = offs_m + BM
            row_ok1 = offs_m1 < m_end
            rows1 = row_source(row_idx_ptr, offs_m1, row_ok1, m_start, False)
            acc, acc1 = rows_times_weight(
                acc, tl.zeros((BM, BN), dtype=tl.float32), h, rows, rows1, m_start, F, wd, e, pid_n, offs_nw,
                F, D, TMA, TMA, False, True, DOT_PREC, BM, BN, BK)
            _down_store(acc1, offs_m1, row_ok1, offs_n, gate_ptr, row_idx_ptr, out_ptr, D, SCATTER, HAS_GATE)
        else:
            acc, _ = rows_times_weight(
                acc, acc, h, rows, rows, m_start, F, wd, e, pid_n, offs_nw, F, D, TMA, TMA, False, False,
                DOT_PREC, BM, BN, BK)
        _down_store(acc, offs_m, row_ok, offs_n, gate_ptr, row_idx_ptr, out_ptr, D, SCATTER, HAS_GATE)
    if not SCATTER:
        zero_tail_rows(out_ptr, tl.sum(cnt, 0), out_rows, D, pid, nprog, BM, BN)


@triton.jit
def _down_store(acc, offs_m, row_ok, offs_n, gate_ptr, row_idx_ptr, out_ptr, D, SCATTER: tl.constexpr,
                HAS_GATE: tl.constexpr):
    if HAS_GATE:
        gate = tl.load(gate_ptr + offs_m, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * gate[:, None]
    store_rows(out_ptr, acc, offs_m, row_ok, offs_n, D, row_idx_ptr, SCATTER)
