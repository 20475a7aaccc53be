"""What Triton's automatic warp specialization does on Hopper, for the shapes of our row-tile kernels.

`tl.range(..., warp_specialize=True)` runs a persistent loop as one TMA-load warpgroup and two
compute warpgroups on Hopper (triton 3.5+). This probe takes one grouped down-projection loop and
switches its parts on and off, to find which constructs the compiler specializes, which it silently
leaves alone, which fail to compile, and which come out wrong:

    python benchmarks/hopper_ws_probe.py --compile   # no GPU needed: compiles for sm90, reports
    python benchmarks/hopper_ws_probe.py             # on a Hopper GPU: correctness and time

On the GPU each variant runs with and without warp specialization on the same inputs (a
qwen3_30b_a3b-sized down projection, 2048 rows per expert so every row block is whole) and prints the
relative difference of the two outputs and both times; a dense persistent matmul and cuBLAS give the
reference. Findings with triton 3.6 on an H200 are in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl

# variant name -> (tile lookup, gate, epilogue)
#   lookup: "arith" tile index arithmetic, "table" scalar loads from a tile table, "locate" the vector
#           search over the experts that the committed row-tile kernels use (`_tiles.locate_tile`)
#   gate:   "none", "ptr" a pointer load of the row gates in the epilogue
#   store:  "tma" a descriptor store, "ptr" a masked pointer store, "atomic" an atomic add,
#           "branch" a descriptor store for whole tiles and a pointer store otherwise
VARIANTS = {
    "tma_store": ("arith", "none", "tma"),
    "table": ("table", "none", "tma"),
    "locate": ("locate", "none", "tma"),
    "gate_ptr": ("table", "ptr", "tma"),
    "ptr_store": ("table", "none", "ptr"),
    "atomic": ("table", "none", "atomic"),
    "branch": ("table", "none", "branch"),
}


@triton.jit
def probe_kernel(h_ptr, wd_ptr, gate_ptr, table_ptr, counts_ptr, out_ptr, E, D, F, S, num_blocks,
                 LOOKUP: tl.constexpr, GATE: tl.constexpr, STORE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    h_desc = tl.make_tensor_descriptor(h_ptr, [S, F], [F, 1], [BM, BK])
    wd_desc = tl.make_tensor_descriptor(wd_ptr, [E, F, D], [F * D, D, 1], [1, BK, BN])
    out_desc = tl.make_tensor_descriptor(out_ptr, [S, D], [D, 1], [BM, BN])
    num_n = tl.cdiv(D, BN)
    if LOOKUP == "locate":
        e_idx = tl.arange(0, 256)
        cnt = tl.load(counts_ptr + e_idx, mask=e_idx < E, other=0)
        nblk = (cnt + BM - 1) // BM
        blk_end = tl.cumsum(nblk, 0)
        row_end = tl.cumsum(cnt, 0)
    for tile in tl.range(tl.program_id(0), num_blocks * num_n, tl.num_programs(0), warp_specialize=WS):
        blk = tile // num_n
        pid_n = tile % num_n
        if LOOKUP == "table":
            e = tl.load(table_ptr + 3 * blk)
            m_start = tl.load(table_ptr + 3 * blk + 1)
            m_end = tl.load(table_ptr + 3 * blk + 2)
        elif LOOKUP == "locate":
            e = tl.sum((blk_end <= blk).to(tl.int32), 0)
            sel = e_idx == e
            m_end = tl.sum(tl.where(sel, row_end, 0), 0)
            m_start = m_end - tl.sum(tl.where(sel, cnt, 0), 0) + (blk - tl.sum(tl.where(sel, blk_end - nblk, 0), 0)) * BM
        else:
            m_start = blk * BM
            m_end = m_start + BM
            e = m_start // (S // E)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(F, BK)):
            a = h_desc.load([m_start, k * BK])
            b = wd_desc.load([e, k * BK, pid_n * BN]).reshape(BK, BN)
            acc = tl.dot(a, b, acc)
        offs_m = m_start + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask = (offs_m < m_end)[:, None] & (offs_n < D)[None, :]
        ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * D + offs_n[None, :]
        if GATE == "ptr":
            acc = acc * tl.load(gate_ptr + offs_m, mask=offs_m < m_end, other=0.0)[:, None]
        if STORE == "tma":
            out_desc.store([m_start, pid_n * BN], acc.to(tl.bfloat16))
        elif STORE == "ptr":
            tl.store(ptrs, acc.to(tl.bfloat16), mask=mask)
        elif STORE == "atomic":
            tl.atomic_add(ptrs, acc.to(tl.bfloat16), mask=mask, sem="relaxed")
        else:
            if m_end - m_start >= BM:
                out_desc.store([m_start, pid_n * BN], acc.to(tl.bfloat16))
            else:
                tl.store(ptrs, acc.to(tl.bfloat16), mask=mask)


def _consts(variant: str, ws: bool) -> dict:
    lookup, gate, store = VARIANTS[variant]
    return dict(LOOKUP=lookup, GATE=gate, STORE=store, BM=128, BN=256, BK=64, WS=ws)


def compile_report() -> None:
    """Compile every variant for sm90 on this machine (no GPU) and say whether it was specialized."""
    from triton.backends.compiler import GPUTarget

    sig = {"h_ptr": "*bf16", "wd_ptr": "*bf16", "gate_ptr": "*fp32", "table_ptr": "*i32", "counts_ptr": "*i32",
           "out_ptr": "*bf16", "E": "i32", "D": "i32", "F": "i32", "S": "i32", "num_blocks": "i32"}
    sig = {n: sig.get(n, "constexpr") for n in probe_kernel.arg_names}
    for variant in VARIANTS:
        src = triton.compiler.ASTSource(fn=probe_kernel, signature=sig, constexprs=_consts(variant, True))
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
            how = "specialized" if "ttg.warp_specialize" in k.asm["ttgir"] else "NOT specialized (silently)"
            print(f"{variant:10s} {how}, {k.metadata.num_warps} warps", flush=True)
        except Exception as exc:  # the pass failing is the finding
            print(f"{variant:10s} compile FAILED: {str(exc).splitlines()[-1][:100]}", flush=True)


def _time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times)


def gpu_report(E: int = 128, F: int = 768, D: int = 2048, rows: int = 2048) -> None:
    dev = torch.device("cuda")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    nsm = torch.cuda.get_device_properties(dev).multi_processor_count
    S, BM = E * rows, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(S, F, device=dev, generator=gen).to(torch.bfloat16)
    wd = (torch.randn(E, F, D, device=dev, generator=gen) / F**0.5).to(torch.bfloat16)
    gate = torch.rand(S, device=dev, generator=gen)
    counts = torch.full((E,), rows, dtype=torch.int32, device=dev)
    table = torch.tensor([(e, e * rows + m, (e + 1) * rows) for e in range(E) for m in range(0, rows, BM)],
                         dtype=torch.int32, device=dev).reshape(-1)
    num_blocks = S // BM
    flops = 2 * S * F * D
    ref = torch.bmm(h.view(E, rows, F).float(), wd.float()).view(S, D)
    t = _time_ms(lambda: torch.mm(h, wd[0]))
    print(f"cuBLAS dense [{S}x{F}] @ [{F}x{D}]: {t:.3f} ms, {flops / t / 1e9:.0f} TFLOP/s", flush=True)
    for variant in VARIANTS:
        outs, times = {}, {}
        for ws in (False, True):
            out = torch.full((S, D), float("nan"), device=dev, dtype=torch.bfloat16)
            grid = (min(nsm, num_blocks * triton.cdiv(D, 256)),)

            def run(out=out, ws=ws):
                probe_kernel[grid](h, wd, gate, table, counts, out, E, D, F, S, num_blocks,
                                   num_warps=4 if ws else 8, num_stages=3, **_consts(variant, ws))
            try:
                run()
                torch.cuda.synchronize()
                outs[ws], times[ws] = out.float(), _time_ms(run)
            except Exception as exc:
                outs[ws], times[ws] = None, str(exc).splitlines()[-1][:80]
        if outs[False] is None or outs[True] is None:
            print(f"{variant:10s} failed: {times}", flush=True)
            continue
        want = ref * gate[:, None] if VARIANTS[variant][1] == "ptr" else ref
        err = {ws: ((o - want).norm() / want.norm()).item() for ws, o in outs.items()}
        print(f"{variant:10s} plain {times[False]:.3f} ms (err {err[False]:.1e}), warp-specialized "
              f"{times[True]:.3f} ms (err {err[True]:.1e}, {outs[True].isnan().sum().item()} unwritten)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true", help="compile for sm90 here and report (no GPU)")
    args = ap.parse_args()
    compile_report() if args.compile else gpu_report()
