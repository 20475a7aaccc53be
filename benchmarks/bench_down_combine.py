"""Down projection's output: atomic scatter-add in the epilogue against a plain store plus a combine pass.

The Triton experts add each routed row's gate-weighted result into its token's row with atomics in
the down projection's epilogue (`down_fwd`, SCATTER). The alternative timed here stores the rows in
sorted order (through TMA where the tile is whole) and then sums each token's k rows in a separate
pass (`row_combine.gather_reduce`, fp32 sums, deterministic). Both run the same kernel main loop on
the same h, weights and routing, in one process:

    python benchmarks/bench_down_combine.py [--shapes qwen3_30b_a3b,...] [--iters 20]

Prints, per shape and routing, the median GPU time of each path, the ratio, and the largest
difference between the two outputs relative to the output's largest value.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_experts import ROUTINGS, SHAPES, make_routing, names_among, time_ms  # noqa: E402
from moe.kernels import _tiles  # noqa: E402
from moe.kernels.grouped_swiglu import _e_pow2, _row_grid  # noqa: E402
from moe.kernels.row_combine import gather_reduce  # noqa: E402
from moe.kernels.swiglu_fwd import down_fwd  # noqa: E402


def run_down(h_SF, wd_EFD, gate_S, row_idx_S, counts_E, out, scatter: bool) -> None:
    E, F, D = wd_EFD.shape
    S = h_SF.shape[0]
    tma = _tiles.device_tma(True, h_SF, wd_EFD, *(() if scatter else (out,)))
    down_fwd[_row_grid(S, E, D, _tiles.persistent_programs(h_SF.device))](
        h_SF, wd_EFD, gate_S, row_idx_S, counts_E, out, E, D, F, S, out.shape[0],
        SCATTER=scatter, HAS_GATE=True, E_POW2=_e_pow2(E), DOT_PREC="tf32", TMA=tma,
    )


def bench(name: str, skew: str, iters: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    s = SHAPES[name]
    gen = torch.Generator(device=device).manual_seed(0)
    row_idx_S, gate_S, counts_E = make_routing(s, skew, gen, device)
    S = row_idx_S.numel()
    h_SF = torch.randn(S, s.F, device=device, generator=gen).to(dtype)
    wd = (torch.randn(s.E, s.F, s.D, device=device, generator=gen) / s.F**0.5).to(dtype)
    idx = row_idx_S.to(torch.int32).contiguous()
    counts = counts_E.to(torch.int32)
    # pos_TK[t, j]: the sorted rows of token t (rows sorted by expert, stable: every token has k).
    pos_TK = torch.argsort(row_idx_S, stable=True).view(s.T, s.k).to(torch.int32)

    def scatter_path() -> torch.Tensor:
        out = torch.zeros(s.T, s.D, dtype=dtype, device=device)
        run_down(h_SF, wd, gate_S, idx, counts, out, scatter=True)
        return out

    def store_combine_path() -> torch.Tensor:
        y_SD = torch.empty(S, s.D, dtype=dtype, device=device)
        run_down(h_SF, wd, gate_S, idx, counts, y_SD, scatter=False)
        return gather_reduce(y_SD, pos_TK, None, dtype)

    a, b = scatter_path(), store_combine_path()
    diff = ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
    t_scatter = time_ms(scatter_path, iters, 3)
    t_store = time_ms(store_combine_path, iters, 3)
    y_SD = torch.empty(S, s.D, dtype=dtype, device=device)
    t_store_only = time_ms(lambda: run_down(h_SF, wd, gate_S, idx, counts, y_SD, scatter=False), iters, 3)
    row = dict(shape=name, skew=skew, scatter_ms=t_scatter, store_combine_ms=t_store,
               store_only_ms=t_store_only, combine_only_ms=t_store - t_store_only,
               store_combine_over_scatter=t_store / t_scatter, max_rel_diff=diff,
               flops_tflops_scatter=2 * S * s.F * s.D / t_scatter / 1e9)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--skews", default="uniform,zipf")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    shapes = names_among(ap, "--shapes", args.shapes, SHAPES)
    skews = names_among(ap, "--skews", args.skews, ROUTINGS)
    if not torch.cuda.is_available():
        sys.exit("bench_down_combine.py needs a CUDA GPU")
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = [bench(n, k, args.iters, device) for n in shapes for k in skews]
    for k, cfg in down_fwd.cache.items():
        print(f"# autotune down_fwd D,F,SCATTER,TMA={k[:4]}: {cfg}")
    print("| shape | routing | scatter ms | store ms | combine ms | store+combine ms | ratio | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['skew']} | {r['scatter_ms']:.3f} | {r['store_only_ms']:.3f} | "
              f"{r['combine_only_ms']:.3f} | {r['store_combine_ms']:.3f} | {r['store_combine_over_scatter']:.2f}x | "
              f"{r['max_rel_diff']:.1e} |")


if __name__ == "__main__":
    main()
