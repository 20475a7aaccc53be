"""Order of the row tiles in the persistent expert kernels (`_tiles.locate_tile`).

Every (expert, row block, column block) must be visited exactly once, with the right first row, and
the tiles of one expert must be neighbours in the order, GROUP_M row blocks sharing each column block
in turn: that is what lets an expert's row blocks share its weight panel through L2. The checker is
also run on the older order (swizzle groups over global row blocks) to show it can fail.
Runs under Triton's interpreter on CPU (the index arithmetic is the same compiled).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

triton = pytest.importorskip("triton")
import triton.language as tl

from moe.kernels._tiles import expert_blocks, locate_tile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _tile_order_kernel(counts_ptr, out_ptr, E, E_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       GROUP_M: tl.constexpr, N):
    e_idx, cnt, nblk, blk_end, row_end = expert_blocks(counts_ptr, E, E_POW2, BM)
    num_n = tl.cdiv(N, BN)
    for tile in range(tl.sum(nblk, 0) * num_n):
        e, m_start, m_end, pid_n = locate_tile(tile, num_n, e_idx, cnt, nblk, blk_end, row_end, BM, GROUP_M)
        tl.store(out_ptr + tile * 4 + 0, e)
        tl.store(out_ptr + tile * 4 + 1, m_start)
        tl.store(out_ptr + tile * 4 + 2, m_end)
        tl.store(out_ptr + tile * 4 + 3, pid_n)


def kernel_order(counts: list[int], bm: int, num_n: int, group_m: int) -> list[tuple[int, int, int, int]]:
    nblk = sum(-(-c // bm) for c in counts)
    out = torch.full((nblk * num_n * 4,), -1, dtype=torch.int32, device=DEVICE)
    e_pow2 = triton.next_power_of_2(len(counts))
    counts_t = torch.tensor(counts, dtype=torch.int32, device=DEVICE)
    _tile_order_kernel[(1,)](counts_t, out, len(counts), E_POW2=e_pow2, BM=bm, BN=16, GROUP_M=group_m,
                             N=num_n * 16)
    return [tuple(r) for r in out.view(-1, 4).tolist()]


def global_order(counts: list[int], bm: int, num_n: int, group_m: int) -> list[tuple[int, int, int, int]]:
    """The previous order: swizzle groups of GROUP_M global row blocks, whatever expert they are in."""
    blocks = []  # (expert, first row, expert end) per global row block
    start = 0
    for e, c in enumerate(counts):
        blocks += [(e, start + j * bm, start + c) for j in range(-(-c // bm))]
        start += c
    order = []
    for tile in range(len(blocks) * num_n):
        width = group_m * num_n
        first_m = tile // width * group_m
        size_m = min(len(blocks) - first_m, group_m)
        pid_m = first_m + (tile % width) % size_m
        order.append((*blocks[pid_m], (tile % width) // size_m))
    return order


def order_problems(order, counts: list[int], bm: int, num_n: int, group_m: int) -> list[str]:
    """What is wrong with a tile order, as readable lines (empty when it is right)."""
    problems = []
    starts = [sum(counts[:e]) for e in range(len(counts))]
    expected = {(e, starts[e] + j * bm, starts[e] + c, n)
                for e, c in enumerate(counts) for j in range(-(-c // bm)) for n in range(num_n)}
    if sorted(order) != sorted(expected):
        problems.append(f"tiles visited {sorted(set(order) ^ expected)[:4]} wrongly (missing, extra or repeated)")
    if len(order) != len(set(order)):
        problems.append("a tile is visited twice")
    experts = [t[0] for t in order]
    for e in set(experts):
        where = [i for i, x in enumerate(experts) if x == e]
        if where != list(range(where[0], where[0] + len(where))):
            problems.append(f"expert {e}'s tiles are not neighbours in the order")
    # Inside an expert: GROUP_M row blocks take each column block in turn.
    for e in set(experts):
        tiles = [t for t in order if t[0] == e]
        nb = -(-counts[e] // bm)
        for g0 in range(0, nb, group_m):
            size = min(group_m, nb - g0)
            chunk = tiles[g0 * num_n:(g0 + size) * num_n]
            for n in range(num_n):
                step = chunk[n * size:(n + 1) * size]
                if {t[3] for t in step} != {n}:
                    problems.append(f"expert {e}: row blocks {g0}.. do not share column block {n} in turn")
                    break
    return problems


# Expert row counts (BM=16): zeros at the ends and in the middle, a single row, exact multiples,
# a hot expert of many blocks, and experts that straddle a GROUP_M boundary of global blocks.
CASES = [
    ([0, 5, 16, 0, 33, 1, 200, 0], 3, 2),
    ([17, 17, 17, 17, 17], 2, 4),
    ([0, 0, 0, 40], 5, 2),
    ([16], 1, 8),
]


@pytest.mark.parametrize("counts,num_n,group_m", CASES)
def test_tiles_go_expert_by_expert(counts, num_n, group_m):
    order = kernel_order(counts, 16, num_n, group_m)
    assert order_problems(order, counts, 16, num_n, group_m) == []


def test_the_order_check_fails_on_the_global_order():
    """Negative control: blocks of 17-row experts straddle the global swizzle groups."""
    counts, num_n, group_m = [17, 17, 17, 17, 17], 2, 4
    problems = order_problems(global_order(counts, 16, num_n, group_m), counts, 16, num_n, group_m)
    assert not any("visited" in p for p in problems)  # it does visit every tile once...
    assert any("not neighbours" in p for p in problems)  # ...but splits experts across groups
