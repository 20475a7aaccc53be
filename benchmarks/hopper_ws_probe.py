"""What Triton's automatic warp specialization does on Hopper, for the shapes of our row-tile kernels.

`tl.range(..., warp_specialize=True)` runs a persistent loop as one TMA-load warpgroup and two
compute warpgroups on Hopper (triton 3.5+). This probe takes one grouped down-projection loop and
switches its parts on and off, to find which constructs the compiler specializes, which it silently
leaves alone, which fail to compile, and which come out wrong:

    python benchmarks/hopper_ws_probe.py --compile   # no GPU needed: compiles for sm90, reports
    python benchmarks/hopper_ws_probe.py             # on a Hopper GPU: correctness and time

On the GPU each variant runs with and without warp specialization on the same inputs (a
qwen3_30b_a3b-sized down projection; 2048 rows per expert, so every row block is whole, then 2000,
so every expert ends in a partial block) and prints each output's error against torch and both
times; cuBLAS gives the reference. `gate_up_probe` does the same for the gate/up projection on rows
already grouped by expert (the expert-parallel path's layout). Findings with triton 3.6 on an H200
are in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from bench_experts import time_ms  # the script's folder is on sys.path

# variant name -> (tile lookup, gate, epilogue)
#   lookup: "arith" tile index arithmetic, "table" scalar loads from a tile table, "locate" the vector
#           search over the experts that the committed row-tile kernels use (`_tiles.locate_tile`)
#   gate:   "none", "ptr" a pointer load of the row gates in the epilogue
#   store:  "tma" a descriptor store, "ptr" a masked pointer store, "atomic" an atomic add,
#           "branch" a descriptor store for whole tiles and a pointer store otherwise, "tile_desc" a
#           descriptor made per tile whose rows end at the expert's end (the hardware clips the rest)
VARIANTS = {
    "tma_store": ("arith", "none", "tma"),
    "table": ("table", "none", "tma"),
    "locate": ("locate", "none", "tma"),
    "gate_ptr": ("table", "ptr", "tma"),
    "ptr_store": ("table", "none", "ptr"),
    "atomic": ("table", "none", "atomic"),
    "branch": ("table", "none", "branch"),
    "tile_desc": ("table", "none", "tile_desc"),
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
        elif STORE == "tile_desc":
            clip_desc = tl.make_tensor_descriptor(out_ptr, [m_end, D], [D, 1], [BM, BN])
            clip_desc.store([m_start, pid_n * BN], acc.to(tl.bfloat16))
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
    sig = {n: "*bf16" for n in ("x_ptr", "wg_ptr", "wu_ptr", "h_ptr", "g_ptr", "u_ptr")}
    sig |= {"table_ptr": "*i32", "E": "i32", "D": "i32", "F": "i32", "S": "i32", "num_blocks": "i32"}
    sig = {n: sig.get(n, "constexpr") for n in gate_up_probe.arg_names}
    for bn in (128, 64):
        src = triton.compiler.ASTSource(fn=gate_up_probe, signature=sig, constexprs=dict(BM=128, BN=bn, BK=64, WS=True))
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
            how = "specialized" if "ttg.warp_specialize" in k.asm["ttgir"] else "NOT specialized (silently)"
            print(f"gate_up BN={bn}: {how}, {k.metadata.num_warps} warps, shared {k.metadata.shared}", flush=True)
        except Exception as exc:
            print(f"gate_up BN={bn}: compile FAILED: {str(exc).splitlines()[-1][:100]}", flush=True)


def _time_ms(fn) -> float:
    if not torch.cuda.is_available():  # an interpreter dry run (TRITON_INTERPRET=1) checks the code only
        return float("nan")
    return time_ms(fn, 20, 3)


@triton.jit
def gate_up_probe(x_ptr, wg_ptr, wu_ptr, table_ptr, h_ptr, g_ptr, u_ptr, E, D, F, S, num_blocks,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    """`gate_up_fwd` on rows already grouped by expert: x tile and both weight tiles through TMA, two
    dots a step, SwiGLU, and h, g, u stored through per-tile descriptors clipped at the expert's end."""
    x_desc = tl.make_tensor_descriptor(x_ptr, [S, D], [D, 1], [BM, BK])
    wg_desc = tl.make_tensor_descriptor(wg_ptr, [E, D, F], [D * F, F, 1], [1, BK, BN])
    wu_desc = tl.make_tensor_descriptor(wu_ptr, [E, D, F], [D * F, F, 1], [1, BK, BN])
    num_n = tl.cdiv(F, BN)
    for tile in tl.range(tl.program_id(0), num_blocks * num_n, tl.num_programs(0), warp_specialize=WS):
        blk = tile // num_n
        pid_n = tile % num_n
        e = tl.load(table_ptr + 3 * blk)
        m_start = tl.load(table_ptr + 3 * blk + 1)
        m_end = tl.load(table_ptr + 3 * blk + 2)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(D, BK)):
            a = x_desc.load([m_start, k * BK])
            acc_g = tl.dot(a, wg_desc.load([e, k * BK, pid_n * BN]).reshape(BK, BN), acc_g)
            acc_u = tl.dot(a, wu_desc.load([e, k * BK, pid_n * BN]).reshape(BK, BN), acc_u)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.make_tensor_descriptor(h_ptr, [m_end, F], [F, 1], [BM, BN]).store([m_start, pid_n * BN], h.to(tl.bfloat16))
        tl.make_tensor_descriptor(g_ptr, [m_end, F], [F, 1], [BM, BN]).store([m_start, pid_n * BN], acc_g.to(tl.bfloat16))
        tl.make_tensor_descriptor(u_ptr, [m_end, F], [F, 1], [BM, BN]).store([m_start, pid_n * BN], acc_u.to(tl.bfloat16))


def _routing(E: int, rows: int, dev: torch.device, BM: int = 128):
    S = E * rows
    table = torch.tensor([(e, e * rows + m, (e + 1) * rows) for e in range(E) for m in range(0, rows, BM)],
                         dtype=torch.int32, device=dev).reshape(-1)
    return S, table, table.numel() // 3, torch.full((E,), rows, dtype=torch.int32, device=dev)


def _pair(poison, run_plain, run_ws, want: list[torch.Tensor], outs_of) -> str:
    """For each way: poison the outputs, run once and compare with `want`, then time the run alone."""
    res = []
    for name, run in (("plain", run_plain), ("warp-specialized", run_ws)):
        try:
            poison()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            got = outs_of()
            err = max(((g.float() - w).norm() / w.norm()).item() for g, w in zip(got, want))
            nan = sum(g.isnan().sum().item() for g in got)
            res.append(f"{name} {_time_ms(run):.3f} ms (err {err:.1e}, {nan} unwritten)")
        except Exception as exc:
            res.append(f"{name} failed: {str(exc).splitlines()[-1][:80]}")
    return ", ".join(res)


def gpu_report(E: int = 128, F: int = 768, D: int = 2048, rows_list: tuple[int, ...] = (2048, 2000)) -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    nsm = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
    gen = torch.Generator(device=dev).manual_seed(0)
    wd = (torch.randn(E, F, D, device=dev, generator=gen) / F**0.5).to(torch.bfloat16)
    wg = (torch.randn(E, D, F, device=dev, generator=gen) / D**0.5).to(torch.bfloat16)
    wu = (torch.randn(E, D, F, device=dev, generator=gen) / D**0.5).to(torch.bfloat16)
    # 2048 rows per expert: whole 128-row blocks; 2000: every expert ends in a partial block.
    for rows in rows_list:
        S, table, num_blocks, counts = _routing(E, rows, dev)
        h = torch.randn(S, F, device=dev, generator=gen).to(torch.bfloat16)
        gate = torch.rand(S, device=dev, generator=gen)
        ref = torch.bmm(h.view(E, rows, F).float(), wd.float()).view(S, D)
        if rows == rows_list[0]:
            t = _time_ms(lambda: torch.mm(h, wd[0]))
            print(f"cuBLAS dense [{S}x{F}] @ [{F}x{D}]: {t:.3f} ms, {2 * S * F * D / t / 1e9:.0f} TFLOP/s")
        out = torch.empty(S, D, device=dev, dtype=torch.bfloat16)
        grid = (min(nsm, num_blocks * triton.cdiv(D, 256)),)
        for variant, (lookup, g, store) in VARIANTS.items():
            if rows % 128 and (lookup == "arith" or store == "tma") or (dev.type == "cpu" and lookup == "locate"):
                continue  # need whole blocks: a partial block's store would reach into the next expert

            def run(ws: bool, variant=variant) -> None:
                probe_kernel[grid](h, wd, gate, table, counts, out, E, D, F, S, num_blocks,
                                   num_warps=4 if ws else 8, num_stages=3, **_consts(variant, ws))
            want = ref * gate[:, None] if g == "ptr" else ref
            # NaN shows an element never written; atomics add into zeros.
            fill = 0.0 if store == "atomic" else float("nan")
            print(f"down {rows} rows/expert {variant:10s} "
                  + _pair(lambda: out.fill_(fill), lambda: run(False), lambda: run(True), [want], lambda: [out]),
                  flush=True)
        x = torch.randn(S, D, device=dev, generator=gen).to(torch.bfloat16)
        gr = torch.bmm(x.view(E, rows, D).float(), wg.float()).view(S, F)
        ur = torch.bmm(x.view(E, rows, D).float(), wu.float()).view(S, F)
        hgu = [torch.empty(S, F, device=dev, dtype=torch.bfloat16) for _ in range(3)]

        def run_gu(ws: bool, bn: int) -> None:
            gate_up_probe[(min(nsm, num_blocks * triton.cdiv(F, bn)),)](
                x, wg, wu, table, *hgu, E, D, F, S, num_blocks, BM=128, BN=bn, BK=64, WS=ws,
                num_warps=4 if ws else 8, num_stages=3)
        for bn in (128, 64):
            print(f"gate_up {rows} rows/expert BN={bn} "
                  + _pair(lambda: [t.fill_(float("nan")) for t in hgu], lambda: run_gu(False, bn), lambda: run_gu(True, bn),
                          [torch.nn.functional.silu(gr) * ur, gr, ur], lambda: hgu), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true", help="compile for sm90 here and report (no GPU)")
    args = ap.parse_args()
    compile_report() if args.compile else gpu_report()
