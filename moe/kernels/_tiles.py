"""Shared pieces of the grouped expert kernels: tile scheduling and autotune configs.

Rows are grouped by expert (expert e owns rows [start_e, start_e + count_e) of the sorted order) and the
counts live on the device, so the host never learns how many row tiles each expert has: every launch is
sized by an upper bound and each program works out its tiles from the counts itself. That keeps the
whole MoE layer free of host syncs.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moe.config import kernel_env

# Read once at import, like Triton itself: the interpreter runs kernels on CPU tensors, one program
# after another, so it wants a single small config and a small persistent grid.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# MOE_TRITON_AUTOTUNE=0 keeps the first config of each list: tests on the GPU compile many small shapes
# and should not pay a benchmark of every config for each. MOE_TRITON_TUNE=wide adds the exploration
# configs (used to choose the short lists; costs a compile each).
AUTOTUNE = os.environ.get("MOE_TRITON_AUTOTUNE", "1") != "0"
WIDE_TUNE = os.environ.get("MOE_TRITON_TUNE", "") == "wide"
# MOE_TRITON_TMA: "auto" feeds the kernels' contiguous operands through tensor descriptors (TMA) on GPUs
# that have it (compute capability 9+) for layers of at least TMA_MIN_WORK; "1" always (also under the
# interpreter, where the tests run both paths); "0" never. Read at each launch (`tma_enabled`), so a
# benchmark can compare the two in one process.
TMA_MODE = kernel_env("MOE_TRITON_TMA")
# Rows x D x F below which "auto" keeps pointer loads. On an H200 TMA cut the GPU time of a layer's
# forward+backward by ~5-10% but added ~0.2 ms of host time per forward+backward (BENCHMARKS.md). The
# benchmark layers lost with TMA at 2^35 and won at 2^38 and up, and deepseek_small training at 2^36
# per layer ran 5% slower with it; the threshold sits between the loss and the wins.
TMA_MIN_WORK = 2**37

Spec = tuple[int, ...]  # (BM, BN, BK, num_warps, num_stages[, programs per SM])


def tile_configs(
    specs: list[Spec], wide: list[Spec] = (), persistent: bool = False, tma_blocks: dict | None = None,
    tma_store: bool = False,
) -> list[triton.Config]:
    """Autotune configs; the first is the default.

    Hopper sizes: 128-row tiles feed wgmma's 64-row warpgroup instructions twice over with 8 warps;
    BK=64 bf16 gives 128-byte rows for the async copies; stages are bounded by the 227 KB of shared
    memory. Persistent kernels also take PPS, programs per SM: 2 lets one program's epilogue overlap
    another's main loop where two fit in shared memory. `tma_blocks` (argument name -> block dims, as
    ints or config keys) sizes the blocks of the arguments that arrive as tensor descriptors.
    `tma_store`: the kernel can store whole row tiles through a descriptor (`store_rows`); each spec is
    offered both ways (key ST), and `smem_prune` drops ST=1 where the launch has TMA off.
    """
    hook = _block_shape_hook(tma_blocks) if tma_blocks else None
    store_ways = (1, 0) if tma_store else (0,)
    if INTERPRET:
        # 16 is tl.dot's smallest size; tiny tiles make the tests cross tile and expert borders. With
        # TMA on, the tests take the descriptor stores (ST=1) and the pointer stores of partial tiles.
        meta = {"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2} | ({"PPS": 1} if persistent else {})
        return [triton.Config(meta | {"ST": store_ways[0]}, num_warps=4, num_stages=1, pre_hook=hook)]
    cfgs = []
    for spec in list(specs) + (list(wide) if WIDE_TUNE else []):
        bm, bn, bk, w, st = spec[:5]
        meta = {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}
        if persistent:
            meta["PPS"] = spec[5] if len(spec) > 5 else 1
        for way in store_ways:
            cfgs.append(triton.Config(meta | ({"ST": way} if tma_store else {}), num_warps=w, num_stages=st,
                                      pre_hook=hook))
    return cfgs


def _block_shape_hook(blocks: dict[str, tuple[int | str, ...]]):
    """Config pre-hook: a descriptor's block shape depends on the tile sizes of the config that runs."""

    def hook(nargs: dict) -> None:
        for name, dims in blocks.items():
            desc = nargs[name]
            if isinstance(desc, TensorDescriptor):
                desc.block_shape = [nargs[d] if isinstance(d, str) else d for d in dims]

    return hook


def tma_enabled(device: torch.device, work: int) -> bool:
    """Whether a layer of `work` = rows x D x F on `device` uses tensor descriptors (see TMA_MODE)."""
    if TMA_MODE == "0" or (INTERPRET and TMA_MODE != "1"):
        return False
    has_tma = INTERPRET or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)
    return has_tma and (TMA_MODE == "1" or work >= TMA_MIN_WORK)


def _tma_fits(t: torch.Tensor) -> bool:
    """TMA wants a 16-byte aligned base and row strides (odd hidden sizes have neither)."""
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(st * es % 16 == 0 for st in t.stride()[:-1])


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def device_tma(use_tma: bool, *tensors: torch.Tensor) -> bool:
    """TMA flag for a persistent kernel that builds its descriptors on the device, once per program.

    Building them there costs the host nothing, where a host-built descriptor added 15-25 us of host
    time to a launch (one descriptor, measured on an H200), which shows on small layers. Triton takes the descriptors' scratch
    from an allocator held in a context variable, so it is set in the launching thread (autograd
    runs backward in its own thread).
    """
    if not (use_tma and all(_tma_fits(t) for t in tensors)):
        return False
    triton.set_allocator(_scratch)
    return True


def tma_args(use_tma: bool, *tensors: torch.Tensor) -> tuple[bool, tuple]:
    """(TMA, args) for a one-program-per-tile kernel: host-built tensor descriptors over `tensors` when
    TMA is on and every one fits, else the tensors themselves with TMA off for the whole launch.

    Built on the device, these would cost a global write per program, and the weight-gradient
    kernels launch one program per output tile. The block shapes set here are placeholders that the
    running config's pre-hook replaces.
    """
    if not (use_tma and all(_tma_fits(t) for t in tensors)):
        return False, tensors
    return True, tuple(TensorDescriptor.from_tensor(t, [16] * t.dim()) for t in tensors)


# Hopper's shared memory per block (the limit Triton reports on an H100), less a margin for scratch.
SMEM_BYTES = 232448 - 2048


def smem_prune(a_ptr: str, b_tiles: int, index_in_loop: bool = False,
               stores_on: Callable[[dict], bool] | None = None):
    """`early_config_prune` dropping configs whose pipeline buffers exceed shared memory.

    Per stage a kernel holds one [BM, BK] A tile and `b_tiles` [BK, BN] B tiles of the dtype of
    argument `a_ptr` (fp32 needs twice bf16's room). Triton keeps `num_stages` buffers, except where
    the gather index is loaded inside the K loop (weight-gradient kernels in gather mode): that load
    takes two of the stages (seen in the compiled kernels). A config that stores through a descriptor
    (ST=1) holds one more [BM, BN] tile; where `stores_on(launch arguments)` is false it would run as
    its ST=0 twin and is dropped. With MOE_TRITON_AUTOTUNE=0 the first config that fits is kept; where
    none fits, a 64x64x32 tile is used.
    """

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        a = named_args[a_ptr]
        esize = (a.base if isinstance(a, TensorDescriptor) else a).element_size()
        gather = bool(kwargs.get("GATHER", named_args.get("GATHER", False)))
        stores = stores_on is not None and bool(stores_on({**named_args, **kwargs}))

        def need(c: triton.Config) -> int:
            bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
            buffers = max(1, c.num_stages - 2) if (index_in_loop and gather) else c.num_stages
            store = bm * bn if c.kwargs.get("ST", 0) else 0
            return (buffers * (bm * bk + b_tiles * bk * bn) + store) * esize

        # With the stores off an ST=1 config runs as its ST=0 twin: drop it unless it has none.
        usable = [c for c in configs if stores or not c.kwargs.get("ST", 0)] or list(configs)
        fitting = [c for c in usable if need(c) <= SMEM_BYTES]
        if not fitting:  # fp32 operands on lists sized for bf16: a small tile that always fits
            base = usable[0]
            small = {**base.kwargs, "BM": 64, "BN": 64, "BK": 32}
            fitting = [triton.Config(small, num_warps=4, num_stages=3, pre_hook=base.pre_hook)]
        return fitting if AUTOTUNE else fitting[:1]

    return prune


def tma_on(args: dict) -> bool:
    """`smem_prune(stores_on=...)` for kernels whose per-row stores may go through a descriptor whenever
    TMA is on."""
    return bool(args.get("TMA"))


def tma_on_without_scatter(args: dict) -> bool:
    """The same for kernels that store per row only when they do not scatter-add (SCATTER off)."""
    return bool(args.get("TMA")) and not args.get("SCATTER")


_NUM_SMS: dict[int, int] = {}


def persistent_programs(device: torch.device) -> int:
    """SMs to size a persistent launch by (times the config's PPS)."""
    if INTERPRET or device.type != "cuda":
        return 3  # a few programs, so the tests exercise the persistent loop's stride
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


@triton.jit
def expert_blocks(counts_ptr, E, E_POW2: tl.constexpr, BM: tl.constexpr):
    """Per-expert row counts, their BM-row block counts, and inclusive cumsums of both (vectors of E_POW2)."""
    e_idx = tl.arange(0, E_POW2)
    cnt = tl.load(counts_ptr + e_idx, mask=e_idx < E, other=0)
    nblk = (cnt + BM - 1) // BM
    blk_end = tl.cumsum(nblk, 0)
    row_end = tl.cumsum(cnt, 0)
    return e_idx, cnt, nblk, blk_end, row_end


@triton.jit
def locate_tile(tile, num_n, e_idx, cnt, nblk, blk_end, row_end, BM: tl.constexpr, GROUP_M: tl.constexpr):
    """(expert, first row, expert's end row, column block) of row tile `tile` of a persistent launch.

    Tiles go expert by expert, with the GROUP_M swizzle inside each expert, so the row blocks of an
    expert, which read the same weight panel, are always neighbours in the order and run at the same
    time, sharing that panel through L2. With swizzle groups over global row blocks instead, an
    expert's blocks could fall into two groups and stream its weights twice: on an H200 this order cut
    fine_grained's gate_up_fwd from 5.73 to 4.68 ms and dh_bwd from 2.84 to 2.40 ms (experts of ~128
    rows), and moved the other shapes by less than the noise (BENCHMARKS.md).
    O(E) vector work per tile, against a BM x BN x K product: negligible, and no host sync.
    """
    e = tl.sum((blk_end * num_n <= tile).to(tl.int32), 0)
    sel = e_idx == e
    nb = tl.sum(tl.where(sel, nblk, 0), 0)
    blk_start = tl.sum(tl.where(sel, blk_end - nblk, 0), 0)
    m_local, pid_n = swizzle(tile - blk_start * num_n, nb, num_n, GROUP_M)
    m_end = tl.sum(tl.where(sel, row_end, 0), 0)
    m_start = m_end - tl.sum(tl.where(sel, cnt, 0), 0) + m_local * BM
    return e, m_start, m_end, pid_n


@triton.jit
def swizzle(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """GROUP_M row blocks share each column block in turn, so neighbouring programs reuse L2 lines."""
    width = GROUP_M * num_n
    group = tile // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % size_m
    pid_n = (tile % width) // size_m
    return pid_m, pid_n


@triton.jit
def store_rows(ptr, desc, vals, m_start, m_end, pid_n, N, BM: tl.constexpr, BN: tl.constexpr,
               USE_DESC: tl.constexpr):
    """Store tile `vals` of rows [m_start, m_start + BM) and column block `pid_n` of a row-major [*, N]
    output; rows from `m_end` on belong to another expert and are not written.

    With USE_DESC a tile that lies wholly inside its expert goes out through tensor descriptor `desc`
    (block [BM, BN], clipped at N by the hardware): Triton then stages it in shared memory and lets the
    copy drain while the program runs its next tile's main loop, where pointer stores keep the warps
    until they are issued. A partial tile (an expert's last one) keeps masked pointer stores.
    """
    vals = vals.to(ptr.dtype.element_ty)
    if USE_DESC:
        if m_end - m_start >= BM:
            desc.store([m_start, pid_n * BN], vals)
        else:
            _masked_rows_store(ptr, vals, m_start, m_end, pid_n, N, BM, BN)
    else:
        _masked_rows_store(ptr, vals, m_start, m_end, pid_n, N, BM, BN)


@triton.jit
def _masked_rows_store(ptr, vals, m_start, m_end, pid_n, N, BM: tl.constexpr, BN: tl.constexpr):
    offs_m = m_start + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = (offs_m < m_end)[:, None] & (offs_n[None, :] < N)
    tl.store(ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], vals, mask=mask)


@triton.jit
def zero_tail_rows(out_ptr, first_row, num_rows, N, pid, nprog, BM: tl.constexpr, BN: tl.constexpr):
    """Zero rows [first_row, num_rows) of a row-major [num_rows, N] output, spread over the programs.

    Pre-grouped inputs may carry padding rows past the counted ones; they belong to no expert and must
    read zero, and doing it here spares the host a sync to learn where the padding starts.
    """
    offs_r = tl.arange(0, BM)
    offs_c = tl.arange(0, BN)
    zeros = tl.zeros((BM, BN), dtype=out_ptr.dtype.element_ty)
    for r0 in range(first_row + pid * BM, num_rows, nprog * BM):
        rows = r0 + offs_r
        for c0 in range(0, N, BN):
            cols = c0 + offs_c
            mask = (rows[:, None] < num_rows) & (cols[None, :] < N)
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], zeros, mask=mask)
