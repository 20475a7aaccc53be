"""Warp-specialized down projection for Hopper, with the token sums in a separate pass.

`down_fwd` adds each routed row's gate-weighted result into its token's row with atomics in its
epilogue, and one program's epilogue never overlaps its next tile's main loop. Triton 3.6 can warp
specialize a persistent loop on Hopper (`tl.range(..., warp_specialize=True)` with num_warps=4: one
warpgroup issues the TMA loads, two compute), so the loads of the next tile run under the epilogue
of this one. The compiler's warp specialization is only right for a loop of TMA loads, dots and
TMA stores, though (measured on an H200 with triton 3.6, BENCHMARKS.md): with a pointer load in the
epilogue it returned wrong sums, a masked pointer store stored nothing, an atomic or a branch around
the store did not compile or was not specialized, and neither was the in-kernel tile lookup of the
other row-tile kernels. So this kernel is written to that shape:
- its tiles come from a table built by `_row_blocks` (expert and first row of every BM-row block);
- it takes no gate: `gate_up_fwd` has scaled h by each row's gate weight (GATE_H), which rounds
  h * gate to the compute dtype once before the product instead of scaling the fp32 result;
- every tile is stored through a descriptor made per tile, whose rows end at the expert's end: the
  hardware drops a partial block's rows past it (the compiler keeps such stores right, where it drops
  masked pointer stores), so the rows land in sorted order, as `down_fwd` stores them;
- in gather mode each token's k rows are then summed by `row_combine.segment_sum` (fp32, fixed
  order), so the forward's sums are bitwise reproducible; pre-grouped rows need no sum.
On an H200, qwen3-sized layer: this kernel 1.27 ms against 1.65 ms for `down_fwd` with atomics, but
the sum pass costs 0.29 ms and the segment sort 0.04 ms, so the forward gains ~0.1 ms (2-4%); on
dsv3_16b (1536 rows per expert) the two came out even, hence `grouped_swiglu.WS_MIN_ROWS`. On
pre-grouped rows it took 1.30 ms against 1.36 ms for `down_fwd`'s row stores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernels._tiles import INTERPRET, expert_blocks, persistent_programs, zero_tail_rows

# Row block of the tile table; fixed, since the table is built before the launch whose autotuner picks
# the other sizes. 128 rows feed the two consumer warpgroups 64 rows each.
BM = 16 if INTERPRET else 128
_CH = 32  # row blocks per program of `_row_blocks`


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BN": 16, "BK": 16}, num_warps=4, num_stages=1)]
    # num_warps=4 is the warpgroup count the compiler specializes from: it runs 12 warps (one
    # producer, two consumer warpgroups). BN=256 with 4 stages exceeds shared memory.
    return [triton.Config({"BN": bn, "BK": 64}, num_warps=4, num_stages=st)
            for bn, st in ((256, 3), (128, 4), (256, 2))]


@triton.jit
def _row_blocks(counts_ptr, table_ptr, out_ptr, E, max_blocks, out_rows, D, E_POW2: tl.constexpr,
                BM: tl.constexpr, CH: tl.constexpr):
    """table[0] = number of row blocks; table[1 + 3b : 4 + 3b] = expert, first and end row of block b
    (experts in order, BM rows a block, an expert's last block partial). The output rows past the
    counted ones (padding of pre-grouped inputs) are zeroed here, where `down_fwd` does it after its
    tile loop: the specialized kernel must not hold pointer stores."""
    e_idx, cnt, nblk, blk_end, row_end = expert_blocks(counts_ptr, E, E_POW2, BM)
    if tl.program_id(0) == 0:
        tl.store(table_ptr, tl.sum(nblk, 0))
    b = tl.program_id(0) * CH + tl.arange(0, CH)
    e_b = tl.sum((blk_end[None, :] <= b[:, None]).to(tl.int32), 1)
    sel = e_idx[None, :] == e_b[:, None]
    end = tl.sum(tl.where(sel, row_end[None, :], 0), 1)
    blk_start = tl.sum(tl.where(sel, blk_end[None, :] - nblk[None, :], 0), 1)
    first = end - tl.sum(tl.where(sel, cnt[None, :], 0), 1) + (b - blk_start) * BM
    b_ok = b < max_blocks
    tl.store(table_ptr + 1 + 3 * b, e_b, mask=b_ok)
    tl.store(table_ptr + 2 + 3 * b, first, mask=b_ok)
    tl.store(table_ptr + 3 + 3 * b, end, mask=b_ok)
    zero_tail_rows(out_ptr, tl.sum(cnt, 0), out_rows, D, tl.program_id(0), tl.num_programs(0), BM, 64)


@triton.autotune(configs=_configs(), key=["D", "F"])
@triton.jit
def down_fwd_ws(
    h_ptr, wd_ptr, table_ptr, out_ptr, E, D, F, S,
    DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """out[rows of block b] = h[rows of block b] @ w_down[its expert], for every block of the table."""
    h_desc = tl.make_tensor_descriptor(h_ptr, [S, F], [F, 1], [BM, BK])
    wd_desc = tl.make_tensor_descriptor(wd_ptr, [E, F, D], [F * D, D, 1], [1, BK, BN])
    num_n = tl.cdiv(D, BN)
    num_tiles = tl.load(table_ptr) * num_n
    # Column blocks fastest: the programs running at once cover a few row blocks of one expert, so
    # its weight panel is read from L2 by all but the first.
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), warp_specialize=True):
        blk = tile // num_n
        pid_n = tile % num_n
        e = tl.load(table_ptr + 1 + 3 * blk)
        m_start = tl.load(table_ptr + 2 + 3 * blk)
        m_end = tl.load(table_ptr + 3 + 3 * blk)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(F, BK)):
            a = h_desc.load([m_start, k * BK])
            b = wd_desc.load([e, k * BK, pid_n * BN]).reshape(BK, BN)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        # A descriptor whose rows end at the expert's end: the hardware drops a partial block's
        # extra rows, which belong to the next expert.
        clip = tl.make_tensor_descriptor(out_ptr, [m_end, D], [D, 1], [BM, BN])
        clip.store([m_start, pid_n * BN], acc.to(out_ptr.dtype.element_ty))


def down_rows(h_SF: torch.Tensor, w_down_EFD: torch.Tensor, counts_E: torch.Tensor, out: torch.Tensor, e_pow2: int,
              dot_prec: str) -> torch.Tensor:
    """out[r] = h_SF[r] @ w_down[expert of r] for the counted rows r, in their sorted order; rows of
    `out` past them are zeroed. Needs tensor descriptors on every operand (`_tiles.device_tma`)."""
    S, F = h_SF.shape
    E, _, D = w_down_EFD.shape
    max_blocks = triton.cdiv(S, BM) + E  # each expert wastes at most one partial block
    table = torch.empty(1 + 3 * max_blocks, dtype=torch.int32, device=h_SF.device)
    _row_blocks[(triton.cdiv(max_blocks, _CH),)](
        counts_E, table, out, E, max_blocks, out.shape[0], D, E_POW2=e_pow2, BM=BM, CH=_CH)
    progs = persistent_programs(h_SF.device)
    down_fwd_ws[lambda m: (max(1, min(progs, max_blocks * triton.cdiv(D, m["BN"]))),)](
        h_SF, w_down_EFD, table, out, E, D, F, S, DOT_PREC=dot_prec, BM=BM,
    )
    return out
