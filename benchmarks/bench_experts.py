"""Routed-expert FFN benchmark: the Triton kernel against the torch._grouped_mm pipeline and the loop.

Run on one GPU, in one process:
    python benchmarks/bench_experts.py [--check] [--shapes qwen3_30b_a3b,...] [--json out.json]

Every backend runs in gather mode by default (x rows read through row_idx_S, gate-weighted scatter-add
into T rows), bf16, as the single-rank MoE layer calls it; `--mode grouped` times the expert-parallel
path instead (x rows already grouped by expert, no gate, one output row per input row). Each time is
the median of --iters CUDA-event timings after warm-up (which also runs the autotuner), and each
reported figure the median of --rounds rounds that interleave every backend and the dense matmul.
Forward is the training forward (inputs require grad, so the activations for backward are kept);
forward+backward returns the gradients of x, the three weights and the gate through torch.autograd.grad
(no .grad accumulation in the timing). TFLOP/s counts the useful work only: forward 2*T*k*D*3F,
forward+backward 3x that. Peak memory is the allocator's peak during
one forward+backward, over what the inputs and weights already hold.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe.kernels import _tiles, grouped_swiglu  # noqa: E402
from moe.model.experts import routed_experts  # noqa: E402

_TMA_DEFAULT = _tiles.TMA_MODE
_SCATTER_DEFAULT = grouped_swiglu.SCATTER_MODE
_WS_DEFAULT = grouped_swiglu.WS_MODE
_ROWS_DESC_DEFAULT = grouped_swiglu.ROWS_DESC_MIN_ROWS
# Variants of the Triton kernel, so one run compares them: "triton_ptr" has TMA off (pointer loads only);
# "triton_combine" sums a token's rows in a separate, reproducible pass instead of the epilogue atomics;
# "triton_nows" keeps the atomic down projection where MOE_TRITON_WS would pick the warp-specialized one;
# "triton_ws" takes the warp-specialized one wherever it can run; "triton_ptrrows" keeps pointer loads for
# pre-grouped rows where descriptors would read them (grouped mode; grouped_swiglu.GROUPED_X_DESC and
# ROWS_DESC_MIN_ROWS).
TRITON_VARIANTS = ("triton", "triton_ptr", "triton_combine", "triton_nows", "triton_ws", "triton_ptrrows")
MODES = ("gather", "grouped")


def run_experts(backend: str, *args):
    """`routed_experts` by backend name, where the Triton variants above select the kernel's options."""
    _tiles.TMA_MODE = "0" if backend == "triton_ptr" else _TMA_DEFAULT
    grouped_swiglu.SCATTER_MODE = "combine" if backend == "triton_combine" else _SCATTER_DEFAULT
    grouped_swiglu.GROUPED_X_DESC = backend != "triton_ptrrows"
    grouped_swiglu.ROWS_DESC_MIN_ROWS = 2**62 if backend == "triton_ptrrows" else _ROWS_DESC_DEFAULT
    grouped_swiglu.WS_MODE = {"triton_nows": "0", "triton_ws": "1"}.get(backend, _WS_DEFAULT)
    return routed_experts(*args, backend="triton" if backend in TRITON_VARIANTS else backend)


@dataclass(frozen=True)
class Shape:
    E: int
    D: int
    F: int
    T: int
    k: int


SHAPES = {
    "deepseek_small": Shape(E=32, D=1024, F=512, T=16384, k=4),
    "dsv3_16b": Shape(E=64, D=2048, F=1408, T=16384, k=6),
    "qwen3_30b_a3b": Shape(E=128, D=2048, F=768, T=32768, k=8),
    "fine_grained": Shape(E=256, D=7168, F=2048, T=4096, k=8),
}
# The per-expert loop is timed only where it finishes in reasonable time (it syncs and launches ~10
# kernels per expert).
LOOP_MAX_EXPERTS = 64
ROUTINGS = ("uniform", "zipf", "balanced")


def make_routing(s: Shape, skew: str, gen: torch.Generator, device: torch.device):
    """Top-k routing; `zipf`: expert popularity ~ 1/rank (random expert order), k distinct per token;
    `balanced`: exactly T*k/E rows per expert (token t takes experts t*k .. t*k+k-1 mod E), which
    shows what the partial row tiles of random routing cost."""
    u = torch.rand(s.T, s.E, device=device, generator=gen)
    if skew == "uniform":
        scores = u
    elif skew == "balanced":
        t = torch.arange(s.T, device=device)[:, None]
        picks_TK = (t * s.k + torch.arange(s.k, device=device)) % s.E
        scores = torch.zeros(s.T, s.E, device=device).scatter_(1, picks_TK, 1.0)
    elif skew == "zipf":
        rank = torch.randperm(s.E, device=device, generator=gen)
        # Gumbel top-k of log p samples k distinct experts with probabilities p, without replacement.
        scores = -torch.log1p(rank.float()) - torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    else:
        raise ValueError(f"routing {skew!r} is not one of {ROUTINGS}")
    expert_idx_TK = scores.topk(s.k, dim=1).indices
    flat = expert_idx_TK.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    row_idx_S = order // s.k
    tokens_per_expert_E = torch.bincount(flat, minlength=s.E)
    gate_S = torch.rand(s.T * s.k, device=device, generator=gen)[order]  # fp32, as the router gives
    return row_idx_S, gate_S, tokens_per_expert_E


def make_inputs(s: Shape, gen: torch.Generator, device: torch.device, dtype=torch.bfloat16):
    x = torch.randn(s.T, s.D, device=device, generator=gen).to(dtype)
    wg = (torch.randn(s.E, s.D, s.F, device=device, generator=gen) / s.D**0.5).to(dtype)
    wu = (torch.randn(s.E, s.D, s.F, device=device, generator=gen) / s.D**0.5).to(dtype)
    wd = (torch.randn(s.E, s.F, s.D, device=device, generator=gen) / s.F**0.5).to(dtype)
    return x, wg, wu, wd


def event_times_ms(fn, iters: int) -> list[float]:
    """GPU time of each of `iters` back-to-back calls (CUDA events, no sync between calls)."""
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


def time_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(event_times_ms(fn, iters))


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def case_inputs(s: Shape, skew: str, mode: str, device):
    """(leaves, routing args after the tokens per expert, dy): gather mode as the single-rank layer
    calls the experts; grouped mode as the expert-parallel path does, on the routed rows grouped by
    expert (no row index, no gate: the combine applies it)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x, wg, wu, wd = make_inputs(s, gen, device)
    row_idx_S, gate_S, counts_E = make_routing(s, skew, gen, device)
    if mode == "grouped":
        x = x[row_idx_S].contiguous()
        route = (counts_E,)
    else:
        gate_S.requires_grad_()
        route = (counts_E, row_idx_S, gate_S, s.T)
    leaves = [t.requires_grad_() for t in (x, wg, wu, wd)]
    dy = torch.randn(x.shape[0] if mode == "grouped" else s.T, s.D, device=device, generator=gen).to(torch.bfloat16)
    return leaves, route, dy


def bench_case(name: str, s: Shape, skew: str, backends: list[str], iters: int, warmup: int, device,
               mode: str = "gather", rounds: int = 3) -> list[dict]:
    """Times every backend and the dense matmul in `rounds` interleaved rounds, and reports the median
    round of each: the GPU's clocks drift under sustained load (one dense matmul read 678 to 809 TFLOP/s
    in four runs on an H200), so backends timed minutes apart are not comparable, rounds close in time
    are."""
    leaves, route, dy = case_inputs(s, skew, mode, device)
    counts_E = route[0]
    wrt = [*leaves, *route[2:3]]  # the gate, in gather mode
    flops_fwd = 2 * s.T * s.k * s.D * 3 * s.F
    run = [b for b in backends if not (b == "torch" and s.E > LOOP_MAX_EXPERTS)]
    dense = dense_matmul(s, device)
    times: dict[str, list[tuple[float, float]]] = {b: [] for b in ["dense_matmul", *run]}
    peak: dict[str, int] = {}
    for r in range(rounds):
        times["dense_matmul"].append((time_ms(dense, iters, warmup), float("nan")))
        for backend in run:
            def fwd(backend: str = backend):
                return run_experts(backend, *leaves, *route)

            def fwd_bwd():
                return torch.autograd.grad(fwd(), wrt, dy)

            times[backend].append((time_ms(fwd, iters, warmup), time_ms(fwd_bwd, iters, warmup)))
            if r == 0:
                peak[backend] = peak_extra_bytes(fwd_bwd)
    rows = []
    for backend in ["dense_matmul", *run]:
        t_f = statistics.median(t for t, _ in times[backend])
        row = dict(shape=name, skew=skew, backend=backend, mode=mode, fwd_ms=t_f, fwd_tflops=flops_fwd / t_f / 1e9,
                   fwd_ms_rounds=[t for t, _ in times[backend]])
        if backend != "dense_matmul":
            t_fb = statistics.median(t for _, t in times[backend])
            row.update(fwdbwd_ms=t_fb, fwdbwd_tflops=3 * flops_fwd / t_fb / 1e9,
                       fwdbwd_ms_rounds=[t for _, t in times[backend]],
                       peak_extra_gib=peak[backend] / 2**30,
                       max_tokens_per_expert=int(counts_E.max()), mean_tokens_per_expert=s.T * s.k / s.E)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def dense_matmul(s: Shape, device):
    """One cuBLAS matmul with the forward's FLOPs: [T*k, D] @ [D, 3F]."""
    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(s.T * s.k, s.D, device=device, generator=gen).to(torch.bfloat16)
    b = torch.randn(s.D, 3 * s.F, device=device, generator=gen).to(torch.bfloat16)
    return lambda: a @ b


def profile_kernels(name: str, s: Shape, backends: list[str], device, skew: str = "uniform",
                    mode: str = "gather") -> None:
    """Per-kernel GPU time of one forward+backward, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    leaves, route, dy = case_inputs(s, skew, mode, device)
    wrt = [*leaves, *route[2:3]]
    for backend in backends:
        if backend == "torch":
            continue

        def step():
            out = run_experts(backend, *leaves, *route)
            return torch.autograd.grad(out, wrt, dy)

        step()
        torch.cuda.synchronize()
        reps = 3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                step()
            torch.cuda.synchronize()
        evs = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in evs) / reps / 1e3
        # Span from the first kernel's start to the last one's end: what the GPU was not busy for is
        # launch gaps or waits (the same run, so clocks cannot explain a difference).
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start]
        span = (max(b for _, b in spans) - min(a for a, _ in spans)) / reps / 1e3 if spans else float("nan")
        print(f"# profile {name} {skew} {mode} {backend}: {total:.3f} ms of kernels per fwd+bwd, first-to-last span "
              f"{span:.3f} ms (GPU idle {span - total:.3f} ms)", flush=True)
        for e in evs[:12]:
            print(f"#   {e.device_time_total / reps / 1e3:8.3f} ms  x{e.count // reps:<3d} {e.key[:90]}", flush=True)


def print_autotune_choices() -> None:
    try:
        from moe.kernels import swiglu_bwd, swiglu_fwd
    except ImportError:
        return
    for mod in (swiglu_fwd, swiglu_bwd):
        for kname in dir(mod):
            k = getattr(mod, kname)
            for key, cfg in getattr(k, "cache", {}).items():
                print(f"# autotune {kname} D,F,mode,TMA={key[:4]}: {cfg}", flush=True)
            # Timings of every config tried for the last key tuned (the shape just run).
            for cfg, ms in sorted((getattr(k, "configs_timings", None) or {}).items(), key=lambda kv: kv[1]):
                print(f"#   tried {kname}: {ms} ms  {cfg}", flush=True)
            if getattr(k, "configs_timings", None):
                k.configs_timings = None


def check(device) -> list[dict]:
    """bf16 kernel vs the torch backend in fp32 on the same values: output and every gradient, in both
    modes."""
    s = Shape(E=32, D=1024, F=768, T=2048, k=4)
    out = []
    for skew in ("uniform", "zipf"):
        gen = torch.Generator(device=device).manual_seed(2)
        x, wg, wu, wd = make_inputs(s, gen, device)
        row_idx_S, gate_S, counts_E = make_routing(s, skew, gen, device)
        dy = torch.randn(s.T, s.D, device=device, generator=gen)
        for mode in MODES:
            grouped = mode == "grouped"
            res = {}
            checked = (*TRITON_VARIANTS, "grouped_mm")
            for backend, dtype in [(b, torch.bfloat16) for b in checked] + [("torch", torch.float32)]:
                leaves = [t.detach().to(dtype).requires_grad_() for t in (x[row_idx_S] if grouped else x, wg, wu, wd)]
                g = gate_S.detach().clone().requires_grad_()
                route = (counts_E,) if grouped else (counts_E, row_idx_S, g, s.T)
                y = run_experts(backend, *leaves, *route)
                dy_m = dy[row_idx_S] if grouped else dy
                grads = torch.autograd.grad(y, leaves if grouped else [*leaves, g], dy_m.to(y.dtype))
                res[backend] = [y.float()] + [t.float() for t in grads]
            for backend in checked:
                errs = {n: ((a - b).norm() / b.norm()).item() for n, a, b in
                        zip(["out", "dx", "dw_gate", "dw_up", "dw_down", "dgate"], res[backend], res["torch"])}
                ok = all(e < 1e-2 for e in errs.values()) and all(torch.isfinite(a).all() for a in res[backend])
                out.append(dict(check=backend, skew=skew, mode=mode, ok=bool(ok), **errs))
                print(json.dumps(out[-1]), flush=True)
    return out


def names_among(ap: argparse.ArgumentParser, flag: str, value: str, allowed) -> list[str]:
    """The comma-separated names of `flag`; exits with a usage error naming any not in `allowed`."""
    names = value.split(",")
    if bad := [n for n in names if n not in allowed]:
        ap.error(f"{flag}: {bad} not among {list(allowed)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--backends", default="triton,grouped_mm,torch",
                    help="of triton, triton_ptr (without TMA), triton_combine (reproducible sums), triton_nows / triton_ws (without / with the warp-specialized down projection), triton_ptrrows, grouped_mm, torch")
    ap.add_argument("--mode", default="gather", choices=MODES,
                    help="gather: token rows by index, gate-weighted sums (single rank); grouped: rows grouped by expert (expert parallel)")
    ap.add_argument("--skews", default="uniform,zipf", help=f"routings, of {', '.join(ROUTINGS)}")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every backend; the median round is reported")
    ap.add_argument("--check", action="store_true", help="bf16 correctness check against the fp32 torch backend first")
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of one fwd+bwd per shape")
    ap.add_argument("--profile-skews", default="uniform", help="routings --profile runs")
    args = ap.parse_args()
    # Bad names fail here, before any GPU work, not after an hour of other shapes.
    names_among(ap, "--skews", args.skews, ROUTINGS)
    names_among(ap, "--profile-skews", args.profile_skews, ROUTINGS)
    names_among(ap, "--shapes", args.shapes, sorted(SHAPES))
    names_among(ap, "--backends", args.backends, (*TRITON_VARIANTS, "grouped_mm", "torch"))
    for flag, value in (("--rounds", args.rounds), ("--iters", args.iters)):
        if value < 1:
            ap.error(f"{flag}: {value} is not a positive number of timings")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    if args.check:
        rows += check(device)
    for name in args.shapes.split(","):
        s = SHAPES[name]
        print(f"# {name} {asdict(s)}", flush=True)
        for skew in args.skews.split(","):
            rows += bench_case(name, s, skew, args.backends.split(","), args.iters, args.warmup, device, args.mode,
                               args.rounds)
        torch.cuda.empty_cache()
        print_autotune_choices()
        if args.profile:
            for skew in args.profile_skews.split(","):
                profile_kernels(name, s, args.backends.split(","), device, skew, args.mode)
            torch.cuda.empty_cache()
    print_autotune_choices()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Markdown table; "fwd vs dense" is against the dense matmul timed in the same rounds."""
    rows = [r for r in rows if "shape" in r and "skew" in r]
    print(f"\n(mode: {', '.join(sorted({r['mode'] for r in rows}))})")
    dense = {(r["shape"], r["skew"], r["mode"]): r["fwd_tflops"] for r in rows if r["backend"] == "dense_matmul"}
    pipe = {(r["shape"], r["skew"], r["mode"]): r for r in rows if r["backend"] == "grouped_mm"}
    uni = {(r["shape"], r["backend"], r["mode"]): r for r in rows if r["skew"] == "uniform"}
    print("\n| shape | routing | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd vs grouped_mm "
          "| fwd vs dense | vs uniform (fwd+bwd) | peak extra GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = (r["shape"], r["skew"], r["mode"])
        if r["backend"] == "dense_matmul":
            print(f"| {r['shape']} | {r['skew']} | dense matmul (same FLOPs) | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} "
                  f"| - | - | - | 100% | - | - |")
            continue
        p = pipe.get(key)
        u = uni.get((r["shape"], r["backend"], r["mode"]))
        ratio = f"{p['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x" if p else "-"
        vs_dense = f"{r['fwd_tflops'] / dense[key]:.0%}" if key in dense else "-"
        skew = f"{r['fwdbwd_ms'] / u['fwdbwd_ms']:.2f}x" if u else "-"
        print(f"| {r['shape']} | {r['skew']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
              f"{r['fwdbwd_ms']:.3f} | {r['fwdbwd_tflops']:.0f} | {ratio} | {vs_dense} | {skew} | "
              f"{r['peak_extra_gib']:.2f} |")


if __name__ == "__main__":
    main()
