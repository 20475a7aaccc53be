"""Weight-gradient kernels of the grouped SwiGLU experts, persistent.

- `dw_down_pers`: dw_down[e] = hc_e^T @ dy_rows_e (tiles over [F, D]).
- `dw_gate_up_pers`: dw_gate[e] = x_rows_e^T @ dg_e and dw_up[e] = x_rows_e^T @ du_e, one x tile load
  for both (tiles over [D, F]).

K is the expert's row count: often one or two K blocks (fine-grained experts get ~128 rows), so a
tile is short and one program per tile spends most of its life waiting on its first loads and on its
stores (Nsight Compute on the H200: 37% of HBM, 33% of the SM). Here a few programs per SM walk the
tiles (pid, pid + nprog, ...), experts by descending row count (the long tiles of a hot expert start
first), and store through descriptors: the TMA store drains while the program starts its next tile.
Each tile's expert, first row and row count are loaded a tile ahead.

With TMA the contiguous operand (dg/du, or hc) and the stores go through tensor descriptors built once
per program; the descriptor-loaded operand is not masked past the expert's rows: the other operand
(pointer-loaded, masked) is zero there, so those rows add 0 * finite values.
"""
from __future__ import annotations

import triton
import triton.language as tl

from moe.kernels._tiles import smem_prune, swizzle, tile_configs


@triton.autotune(
    configs=tile_configs(
        [(128, 128, 64, 4, 2, 2), (128, 128, 64, 4, 2, 3), (128, 128, 64, 8, 3, 1), (128, 256, 64, 8, 2, 1),
         (128, 128, 32, 4, 2, 2), (64, 128, 64, 4, 2, 3)],
        persistent=True,
    ),
    key=["D", "F", "GATHER", "TMA"],
    prune_configs_by={"early_config_prune": smem_prune("hc_ptr", 1, index_in_loop=True)},
)
@triton.jit
def dw_down_pers(
    hc_ptr, dy_ptr, row_idx_ptr, order_ptr, starts_ptr, counts_ptr, dwd_ptr,
    E, D, F, S,
    GATHER: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PPS: tl.constexpr,
):
    # Tile (f block, d block) of dw_down[e], K = the expert's rows.
    if TMA:
        hc_desc = tl.make_tensor_descriptor(hc_ptr, [S, F], [F, 1], [BK, BM])
        dwd_desc = tl.make_tensor_descriptor(dwd_ptr, [E, F, D], [F * D, D, 1], [1, BM, BN])
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_m = tl.cdiv(F, BM)
    num_n = tl.cdiv(D, BN)
    per_expert = num_m * num_n
    offs_k = tl.arange(0, BK)
    r = pid // per_expert
    nxt_e = tl.load(order_ptr + r)
    nxt_start = tl.load(starts_ptr + r)
    nxt_rows = tl.load(counts_ptr + r)
    for tile in range(pid, E * per_expert, nprog):
        e = nxt_e
        start = nxt_start
        n_rows = nxt_rows
        r = tl.minimum((tile + nprog) // per_expert, E - 1)
        nxt_e = tl.load(order_ptr + r)
        nxt_start = tl.load(starts_ptr + r)
        nxt_rows = tl.load(counts_ptr + r)
        pid_m, pid_n = swizzle(tile % per_expert, num_m, num_n, GROUP_M)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_mw = offs_m % F
        offs_nw = offs_n % D
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, n_rows, BK):
            rows = start + k0 + offs_k
            k_ok = k0 + offs_k < n_rows
            if GATHER:
                src = tl.load(row_idx_ptr + rows, mask=k_ok, other=0).to(tl.int64)
            else:
                src = rows.to(tl.int64)
            if TMA:
                a = hc_desc.load([start + k0, pid_m * BM])
            else:
                a = tl.load(hc_ptr + rows.to(tl.int64)[:, None] * F + offs_mw[None, :], mask=k_ok[:, None],
                            other=0.0)
            b = tl.load(dy_ptr + src[:, None] * D + offs_nw[None, :], mask=k_ok[:, None], other=0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)
        # An expert with no rows runs no iteration and stores exact zeros: its gradient is 0, not None.
        if TMA:
            dwd_desc.store([e, pid_m * BM, pid_n * BN], acc.to(dwd_ptr.dtype.element_ty).reshape(1, BM, BN))
        else:
            o_off = e.to(tl.int64) * F * D + offs_m[:, None] * D + offs_n[None, :]
            o_mask = (offs_m[:, None] < F) & (offs_n[None, :] < D)
            tl.store(dwd_ptr + o_off, acc.to(dwd_ptr.dtype.element_ty), mask=o_mask)


@triton.autotune(
    configs=tile_configs(
        [(64, 128, 32, 4, 2, 3), (128, 64, 32, 4, 2, 3), (64, 128, 64, 4, 2, 3), (128, 64, 64, 4, 2, 2),
         (128, 128, 64, 8, 2, 1), (64, 128, 32, 4, 2, 2)],
        persistent=True,
    ),
    key=["D", "F", "GATHER", "TMA"],
    prune_configs_by={"early_config_prune": smem_prune("x_ptr", 2, index_in_loop=True)},
)
@triton.jit
def dw_gate_up_pers(
    x_ptr, dg_ptr, du_ptr, row_idx_ptr, order_ptr, starts_ptr, counts_ptr, dwg_ptr, dwu_ptr,
    E, D, F, S,
    GATHER: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PPS: tl.constexpr,
):
    # Tile (d block, f block) of dw_gate[e] and dw_up[e], K = the expert's rows.
    if TMA:
        dg_desc = tl.make_tensor_descriptor(dg_ptr, [S, F], [F, 1], [BK, BN])
        du_desc = tl.make_tensor_descriptor(du_ptr, [S, F], [F, 1], [BK, BN])
        dwg_desc = tl.make_tensor_descriptor(dwg_ptr, [E, D, F], [D * F, F, 1], [1, BM, BN])
        dwu_desc = tl.make_tensor_descriptor(dwu_ptr, [E, D, F], [D * F, F, 1], [1, BM, BN])
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_m = tl.cdiv(D, BM)
    num_n = tl.cdiv(F, BN)
    per_expert = num_m * num_n
    offs_k = tl.arange(0, BK)
    r = pid // per_expert
    nxt_e = tl.load(order_ptr + r)
    nxt_start = tl.load(starts_ptr + r)
    nxt_rows = tl.load(counts_ptr + r)
    for tile in range(pid, E * per_expert, nprog):
        e = nxt_e
        start = nxt_start
        n_rows = nxt_rows
        r = tl.minimum((tile + nprog) // per_expert, E - 1)
        nxt_e = tl.load(order_ptr + r)
        nxt_start = tl.load(starts_ptr + r)
        nxt_rows = tl.load(counts_ptr + r)
        pid_m, pid_n = swizzle(tile % per_expert, num_m, num_n, GROUP_M)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_mw = offs_m % D
        offs_nw = offs_n % F
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, n_rows, BK):
            rows = start + k0 + offs_k
            k_ok = k0 + offs_k < n_rows
            if GATHER:
                src = tl.load(row_idx_ptr + rows, mask=k_ok, other=0).to(tl.int64)
            else:
                src = rows.to(tl.int64)
            a_t = tl.trans(tl.load(x_ptr + src[:, None] * D + offs_mw[None, :], mask=k_ok[:, None], other=0.0))
            if TMA:
                bg = dg_desc.load([start + k0, pid_n * BN])
                bu = du_desc.load([start + k0, pid_n * BN])
            else:
                r_off = rows.to(tl.int64)[:, None] * F + offs_nw[None, :]
                bg = tl.load(dg_ptr + r_off, mask=k_ok[:, None], other=0.0)
                bu = tl.load(du_ptr + r_off, mask=k_ok[:, None], other=0.0)
            acc_g = tl.dot(a_t, bg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(a_t, bu, acc_u, input_precision=DOT_PREC)
        if TMA:
            dt = dwg_ptr.dtype.element_ty
            dwg_desc.store([e, pid_m * BM, pid_n * BN], acc_g.to(dt).reshape(1, BM, BN))
            dwu_desc.store([e, pid_m * BM, pid_n * BN], acc_u.to(dt).reshape(1, BM, BN))
        else:
            o_off = e.to(tl.int64) * D * F + offs_m[:, None] * F + offs_n[None, :]
            o_mask = (offs_m[:, None] < D) & (offs_n[None, :] < F)
            tl.store(dwg_ptr + o_off, acc_g.to(dwg_ptr.dtype.element_ty), mask=o_mask)
            tl.store(dwu_ptr + o_off, acc_u.to(dwu_ptr.dtype.element_ty), mask=o_mask)
