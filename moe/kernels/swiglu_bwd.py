"""Backward kernels of the grouped SwiGLU experts.

With dy the gradient of the output (read at the token's row in gather mode) and c the gate weight:
- `dh_bwd` (row tiles, K = D): a = dy_rows @ w_down[e]^T.
- `swiglu_bwd_rows` (whole rows): recomputes h = silu(g) * u from the saved pre-activations and gives
  dgate = <h, a>, dg and du of the SwiGLU, and hc = c * h for the down projection's weight gradient.
- `dw_down_bwd` (weight tiles, K = the expert's rows): dw_down[e] = hc_e^T @ dy_rows_e.
- `dw_gate_up_bwd` (weight tiles): dw_gate[e] = x_rows_e^T @ dg_e and dw_up[e] = x_rows_e^T @ du_e with one
  load of the x tile for both.
- `dx_bwd` (row tiles, K = F): dx_rows = dg @ w_gate[e]^T + du @ w_up[e]^T, atomically added to the token's
  row in gather mode (SCATTER), else stored per sorted row (pre-grouped, or MOE_TRITON_SCATTER=combine).
The weight-gradient kernels take one program per output tile, experts ordered by descending row count,
so the long tiles of a hot expert start first and skewed routing does not leave a tail.

With TMA (see `_tiles.TMA_MODE`) weight tiles and contiguous row tiles come through tensor descriptors
and the weight gradients are stored through one. In the weight-gradient kernels the descriptor-loaded
operand is not masked past the expert's rows: the other operand (pointer-loaded, masked) is zero
there, so those rows add 0 * finite values (rows of the next expert, zeroed padding, or TMA's zero
fill past the end). On pre-grouped rows (ROWS_DESC) that other operand comes through a descriptor made
per tile on the device whose rows end at the expert's last row, so the hardware fills the zeros and
the main loop holds no pointer loads.
"""
from __future__ import annotations

import triton
import triton.language as tl

from moe.kernels._tiles import (
    AUTOTUNE, INTERPRET, expert_blocks, locate_tile, smem_prune, store_rows, swizzle, tile_configs, tma_on,
    tma_on_without_scatter, zero_tail_rows,
)


@triton.autotune(
    configs=tile_configs(
        [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 4, 1)],
        wide=[(64, 128, 64, 4, 4), (64, 128, 64, 4, 3, 2), (64, 256, 64, 8, 3, 1),
              (128, 256, 64, 8, 4)], persistent=True, tma_store=True,
    ),
    key=["D", "F", "GATHER", "TMA"],
    prune_configs_by={"early_config_prune": smem_prune("dy_ptr", 1, stores_on=tma_on)},
)
@triton.jit
def dh_bwd(
    dy_ptr, row_idx_ptr, wd_ptr, counts_ptr, a_ptr,
    E, D, F, S,
    GATHER: tl.constexpr, E_POW2: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PPS: tl.constexpr,
    ST: tl.constexpr,
):
    """a = dy_rows @ w_down[e]^T, stored per sorted row.

    The SwiGLU backward is a separate row kernel: fused here its epilogue held five fp32 tiles and
    spilled, and the GEMM ran at half the speed of the others (measured on H100).
    """
    if TMA:
        wd_desc = tl.make_tensor_descriptor(wd_ptr, [E, F, D], [F * D, D, 1], [1, BN, BK])
    use_desc: tl.constexpr = TMA and ST
    if use_desc:
        a_desc = tl.make_tensor_descriptor(a_ptr, [S, F], [F, 1], [BM, BN])
    else:
        a_desc = a_ptr
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    e_idx, cnt, nblk, blk_end, row_end = expert_blocks(counts_ptr, E, E_POW2, BM)
    num_m = tl.sum(nblk, 0)
    num_n = tl.cdiv(F, BN)
    for tile in range(pid, num_m * num_n, nprog):
        e, m_start, m_end, pid_n = locate_tile(tile, num_n, e_idx, cnt, nblk, blk_end, row_end, BM, GROUP_M)
        offs_m = m_start + tl.arange(0, BM)
        row_ok = offs_m < m_end
        if GATHER:
            src = tl.load(row_idx_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        else:
            src = tl.where(row_ok, offs_m, m_start).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_nw = offs_n % F
        offs_k = tl.arange(0, BK)
        a_ptrs = dy_ptr + src[:, None] * D + offs_k[None, :]
        # B[k, n] = w_down[e][n, k]: w_down read transposed, no transposed copy made.
        if not TMA:
            b_ptrs = wd_ptr + e.to(tl.int64) * F * D + offs_nw[None, :] * D + offs_k[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(D, BK)):
            k_ok = offs_k < D - k * BK
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            if TMA:
                b = tl.trans(wd_desc.load([e, pid_n * BN, k * BK]).reshape(BN, BK))
            else:
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
                b_ptrs += BK
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += BK
        store_rows(a_ptr, a_desc, acc, m_start, m_end, pid_n, F, BM, BN, use_desc)


def _rows_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BR": 16, "BC": 16}, num_warps=4)]
    cfgs = [triton.Config({"BR": 16, "BC": 256}, num_warps=4), triton.Config({"BR": 32, "BC": 256}, num_warps=8)]
    return cfgs if AUTOTUNE else cfgs[:1]  # no shared memory to outgrow


@triton.autotune(configs=_rows_configs(), key=["F"])
@triton.jit
def swiglu_bwd_rows(
    a_ptr, g_ptr, u_ptr, gate_ptr, counts_ptr, dg_ptr, du_ptr, hc_ptr, dgate_ptr,
    S, E, F,
    HAS_GATE: tl.constexpr, E_POW2: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    """SwiGLU and gate backward, BR whole rows per program (so dgate needs no atomics).

    With c the gate: dgate = <h, a> (= <dy, y> without a stored y), dg = c a u silu'(g), du = c a silu(g),
    and hc = c h, the down projection's input with the gate folded in for its weight gradient.
    """
    e_idx = tl.arange(0, E_POW2)
    total = tl.sum(tl.load(counts_ptr + e_idx, mask=e_idx < E, other=0), 0)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    # Rows past the counted ones were never written by the forward: they read as zero here.
    row_ok = rows < total
    if HAS_GATE:
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        dgate = tl.zeros((BR,), dtype=tl.float32)
    base = rows.to(tl.int64)[:, None] * F
    for c0 in range(0, F, BC):
        cols = c0 + tl.arange(0, BC)
        mask = row_ok[:, None] & (cols[None, :] < F)
        off = base + cols[None, :]
        a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        h = silu * u
        if HAS_GATE:
            dgate += tl.sum(h * a, 1)
            a = a * gate[:, None]
            h = h * gate[:, None]
        store_ok = (rows[:, None] < S) & (cols[None, :] < F)  # padding rows get zeros, not garbage
        tl.store(hc_ptr + off, h.to(hc_ptr.dtype.element_ty), mask=store_ok)
        tl.store(du_ptr + off, (a * silu).to(du_ptr.dtype.element_ty), mask=store_ok)
        tl.store(dg_ptr + off, (a * u * (sig + silu * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=store_ok)
    if HAS_GATE:
        tl.store(dgate_ptr + rows, dgate, mask=rows < S)


@triton.jit
def _dx_k_loop(acc, a, b, e, m_start, pid_n, offs_k, F, TMA: tl.constexpr, DOT_PREC: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr):
    """acc += d_rows @ w[e]^T over K = F, for one of gate/up. Under TMA `a` and `b` are descriptors,
    else pointer blocks at K offset 0."""
    for k in range(0, tl.cdiv(F, BK)):
        if TMA:
            # Rows past the expert's end are read, and their results dropped at the store.
            a_tile = a.load([m_start, k * BK])
            b_tile = tl.trans(b.load([e, pid_n * BN, k * BK]).reshape(BN, BK))
        else:
            k_ok = offs_k < F - k * BK
            a_tile = tl.load(a, mask=k_ok[None, :], other=0.0)
            b_tile = tl.load(b, mask=k_ok[:, None], other=0.0)
            a += BK
            b += BK
        acc = tl.dot(a_tile, b_tile, acc, input_precision=DOT_PREC)
    return acc


@triton.autotune(
    configs=tile_configs(
        [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4)],
        wide=[(64, 128, 64, 4, 4), (64, 128, 64, 4, 3, 2), (64, 256, 64, 8, 3, 1), (64, 256, 64, 8, 4, 1),
              (128, 256, 64, 8, 4)], persistent=True, tma_store=True,
    ),
    key=["D", "F", "SCATTER", "TMA"], reset_to_zero=["dx_ptr"],
    prune_configs_by={"early_config_prune": smem_prune("dg_ptr", 1, stores_on=tma_on_without_scatter)},
)
@triton.jit
def dx_bwd(
    dg_ptr, du_ptr, wg_ptr, wu_ptr, row_idx_ptr, counts_ptr, dx_ptr,
    E, D, F, S, dx_rows,
    SCATTER: tl.constexpr, E_POW2: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PPS: tl.constexpr,
    ST: tl.constexpr,
):
    if TMA:
        dg_desc = tl.make_tensor_descriptor(dg_ptr, [S, F], [F, 1], [BM, BK])
        du_desc = tl.make_tensor_descriptor(du_ptr, [S, F], [F, 1], [BM, BK])
        wg_desc = tl.make_tensor_descriptor(wg_ptr, [E, D, F], [D * F, F, 1], [1, BN, BK])
        wu_desc = tl.make_tensor_descriptor(wu_ptr, [E, D, F], [D * F, F, 1], [1, BN, BK])
    use_desc: tl.constexpr = TMA and ST and not SCATTER
    if use_desc:
        dx_desc = tl.make_tensor_descriptor(dx_ptr, [dx_rows, D], [D, 1], [BM, BN])
    else:
        dx_desc = dx_ptr
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
        if TMA:
            ag, au, bg, bu = dg_desc, du_desc, wg_desc, wu_desc
        else:
            w_base = e.to(tl.int64) * D * F
            ag = dg_ptr + rows[:, None] * F + offs_k[None, :]
            au = du_ptr + rows[:, None] * F + offs_k[None, :]
            # B[k, n] = w[e][n, k] (w is [D, F]): read transposed in place.
            bg = wg_ptr + w_base + offs_nw[None, :] * F + offs_k[:, None]
            bu = wu_ptr + w_base + offs_nw[None, :] * F + offs_k[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # Two loops rather than one with both products: each stage then holds one A and one B tile,
        # which leaves shared memory for a deeper pipeline.
        acc = _dx_k_loop(acc, ag, bg, e, m_start, pid_n, offs_k, F, TMA, DOT_PREC, BN, BK)
        acc = _dx_k_loop(acc, au, bu, e, m_start, pid_n, offs_k, F, TMA, DOT_PREC, BN, BK)
        if SCATTER:
            o_mask = row_ok[:, None] & (offs_n[None, :] < D)
            dst = tl.load(row_idx_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
            tl.atomic_add(
                dx_ptr + dst[:, None] * D + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty), mask=o_mask,
                sem="relaxed",
            )
        else:
            store_rows(dx_ptr, dx_desc, acc, m_start, m_end, pid_n, D, BM, BN, use_desc)
    if not SCATTER:
        zero_tail_rows(dx_ptr, tl.sum(cnt, 0), dx_rows, D, pid, nprog, BM, BN)


@triton.jit
def _weight_tile(order_ptr, starts_ptr, counts_ptr, num_m, num_n, GROUP_M: tl.constexpr):
    """(expert, its first sorted row, its row count, row block, column block) of this program's tile of a
    weight gradient, one program per tile, experts in the longest-first order of `order_ptr`.

    Starts and counts come permuted the same way as the order, so the three loads are independent (one
    memory latency per tile, not two: it shows when tiles are short)."""
    pid = tl.program_id(0)
    per_expert = num_m * num_n
    r = pid // per_expert
    e = tl.load(order_ptr + r)
    start = tl.load(starts_ptr + r)
    n_rows = tl.load(counts_ptr + r)
    pid_m, pid_n = swizzle(pid % per_expert, num_m, num_n, GROUP_M)
    return e, start, n_rows, pid_m, pid_n


@triton.jit
def _expert_rows_desc(ptr, start, n_rows, N, BK: tl.constexpr, BN: tl.constexpr):
    """Descriptor over rows [0, start + n_rows) of a row-major [*, N] tensor, blocks [BK, BN]: a block
    reaching past the expert's last row reads zeros there. (At least one row: an idle expert's
    descriptor is never loaded from.)"""
    return tl.make_tensor_descriptor(ptr, [tl.maximum(start + n_rows, 1), N], [N, 1], [BK, BN])


@triton.autotune(
    configs=tile_configs(
        [(128, 128, 64, 8, 5), (128, 256, 64, 8, 5), (128, 128, 64, 4, 5), (128, 128, 64, 8, 4),
         (128, 128, 32, 4, 2), (128, 128, 64, 4, 2)],
        wide=[(128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (64, 128, 64, 4, 5), (64, 128, 64, 4, 3),
              (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 256, 64, 8, 3), (128, 128, 32, 8, 4),
              # few stages: a short K loop (an expert's rows) needs little pipelining, and smaller
              # shared memory lets more programs share an SM to hide their load latency
              (128, 128, 64, 8, 2), (128, 256, 64, 8, 2), (64, 256, 64, 4, 2),
              (64, 128, 64, 4, 2), (64, 128, 32, 4, 3), (128, 256, 32, 8, 2),
              (64, 256, 32, 4, 2), (128, 128, 32, 4, 3), (128, 128, 16, 4, 2), (256, 128, 32, 8, 2),
              (128, 64, 32, 4, 2)],
        tma_blocks={"hc_ptr": ("BK", "BM"), "dwd_ptr": (1, "BM", "BN")},
    ),
    key=["D", "F", "GATHER", "TMA", "ROWS_DESC"],
    prune_configs_by={"early_config_prune": smem_prune("hc_ptr", 1, index_in_loop=True)},
)
@triton.jit
def dw_down_bwd(
    hc_ptr, dy_ptr, row_idx_ptr, order_ptr, starts_ptr, counts_ptr, dwd_ptr,
    D, F,
    GATHER: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr, ROWS_DESC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Tile (f block, d block) of dw_down[e], K = the expert's rows.
    e, start, n_rows, pid_m, pid_n = _weight_tile(order_ptr, starts_ptr, counts_ptr, tl.cdiv(F, BM),
                                                  tl.cdiv(D, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_mw = offs_m % F
    offs_nw = offs_n % D
    offs_k = tl.arange(0, BK)
    if ROWS_DESC:
        dy_desc = _expert_rows_desc(dy_ptr, start, n_rows, D, BK, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, n_rows, BK):
        rows = start + k0 + offs_k
        k_ok = k0 + offs_k < n_rows
        if GATHER:
            src = tl.load(row_idx_ptr + rows, mask=k_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        if TMA:
            a = hc_ptr.load([start + k0, pid_m * BM])
        else:
            a = tl.load(hc_ptr + rows.to(tl.int64)[:, None] * F + offs_mw[None, :], mask=k_ok[:, None], other=0.0)
        if ROWS_DESC:
            b = dy_desc.load([start + k0, pid_n * BN])
        else:
            b = tl.load(dy_ptr + src[:, None] * D + offs_nw[None, :], mask=k_ok[:, None], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)
    # An expert with no rows runs no iteration and stores exact zeros: its gradient is 0, not None.
    if TMA:
        dwd_ptr.store([e, pid_m * BM, pid_n * BN], acc.to(dwd_ptr.dtype).reshape(1, BM, BN))
    else:
        o_off = e.to(tl.int64) * F * D + offs_m[:, None] * D + offs_n[None, :]
        o_mask = (offs_m[:, None] < F) & (offs_n[None, :] < D)
        tl.store(dwd_ptr + o_off, acc.to(dwd_ptr.dtype.element_ty), mask=o_mask)


@triton.autotune(
    configs=tile_configs(
        [(128, 128, 64, 8, 5), (128, 64, 64, 4, 4), (64, 128, 32, 4, 2), (128, 64, 32, 4, 2)],
        wide=[(128, 64, 64, 4, 5), (128, 64, 128, 4, 3), (64, 128, 64, 4, 5), (128, 128, 64, 8, 4),
              (64, 128, 64, 4, 3), (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3),
              (128, 128, 32, 8, 4), (64, 128, 32, 4, 4),
              (64, 128, 64, 4, 2), (128, 128, 64, 8, 2), (64, 256, 64, 8, 2), (128, 64, 64, 4, 2),
              (64, 128, 32, 4, 3), (64, 64, 64, 4, 2), (64, 128, 16, 4, 2), (64, 64, 32, 4, 2),
              (64, 256, 32, 8, 2), (128, 128, 32, 8, 2)],
        tma_blocks={"dg_ptr": ("BK", "BN"), "du_ptr": ("BK", "BN"), "dwg_ptr": (1, "BM", "BN"),
                    "dwu_ptr": (1, "BM", "BN")},
    ),
    key=["D", "F", "GATHER", "TMA", "ROWS_DESC"],
    prune_configs_by={"early_config_prune": smem_prune("x_ptr", 2, index_in_loop=True)},
)
@triton.jit
def dw_gate_up_bwd(
    x_ptr, dg_ptr, du_ptr, row_idx_ptr, order_ptr, starts_ptr, counts_ptr, dwg_ptr, dwu_ptr,
    D, F,
    GATHER: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr, ROWS_DESC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Tile (d block, f block) of dw_gate[e] and dw_up[e], K = the expert's rows.
    e, start, n_rows, pid_m, pid_n = _weight_tile(order_ptr, starts_ptr, counts_ptr, tl.cdiv(D, BM),
                                                  tl.cdiv(F, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_mw = offs_m % D
    offs_nw = offs_n % F
    offs_k = tl.arange(0, BK)
    if ROWS_DESC:
        x_desc = _expert_rows_desc(x_ptr, start, n_rows, D, BK, BM)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, n_rows, BK):
        rows = start + k0 + offs_k
        k_ok = k0 + offs_k < n_rows
        if GATHER:
            src = tl.load(row_idx_ptr + rows, mask=k_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        if ROWS_DESC:
            a = x_desc.load([start + k0, pid_m * BM])
        else:
            a = tl.load(x_ptr + src[:, None] * D + offs_mw[None, :], mask=k_ok[:, None], other=0.0)
        a_t = tl.trans(a)
        if TMA:
            bg = dg_ptr.load([start + k0, pid_n * BN])
            bu = du_ptr.load([start + k0, pid_n * BN])
        else:
            r_off = rows.to(tl.int64)[:, None] * F + offs_nw[None, :]
            bg = tl.load(dg_ptr + r_off, mask=k_ok[:, None], other=0.0)
            bu = tl.load(du_ptr + r_off, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(a_t, bg, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a_t, bu, acc_u, input_precision=DOT_PREC)
    if TMA:
        dt = dwg_ptr.dtype
        dwg_ptr.store([e, pid_m * BM, pid_n * BN], acc_g.to(dt).reshape(1, BM, BN))
        dwu_ptr.store([e, pid_m * BM, pid_n * BN], acc_u.to(dt).reshape(1, BM, BN))
    else:
        o_off = e.to(tl.int64) * D * F + offs_m[:, None] * F + offs_n[None, :]
        o_mask = (offs_m[:, None] < D) & (offs_n[None, :] < F)
        tl.store(dwg_ptr + o_off, acc_g.to(dwg_ptr.dtype.element_ty), mask=o_mask)
        tl.store(dwu_ptr + o_off, acc_u.to(dwu_ptr.dtype.element_ty), mask=o_mask)
