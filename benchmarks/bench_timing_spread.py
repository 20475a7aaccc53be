"""Spread of one forward+backward's time: host time per call, and GPU time per call back to back
(as bench_experts.py times it) and with a sync before each call, for the Triton kernel and the
torch._grouped_mm pipeline.

Run from the repository root on a GPU: `python3 benchmarks/bench_timing_spread.py --shapes dsv3_16b`.
Host time is taken while a long GPU sleep keeps the queue full, so it is the Python and launch cost
alone; if it stays well under the GPU time, the timed figures are not bound by the host.
`--cprofile N` adds a cProfile of N host calls per backend (where the host time goes), and
`--per-kernel N` the spread of each kernel's GPU time over N back-to-back calls (which kernel swings).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_experts import (
    SHAPES,
    event_times_ms,
    make_inputs,
    make_routing,
    names_among,
    run_experts,
)


def spread(values: list[float]) -> str:
    return f"min {min(values):.3f} med {statistics.median(values):.3f} max {max(values):.3f}"


def measure(fb, calls: int) -> tuple[list[float], list[float], list[float]]:
    """(host ms per call, back-to-back GPU ms per call, synced GPU ms per call)."""
    for _ in range(3):
        fb()
    torch.cuda.synchronize()
    host = []
    for _ in range(10):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work queued ahead, so the host never waits
        t0 = time.perf_counter()
        fb()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    back_to_back = event_times_ms(fb, calls)
    synced = []
    for _ in range(calls):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fb()
        b.record()
        torch.cuda.synchronize()
        synced.append(a.elapsed_time(b))
    return host, back_to_back, synced


def host_profile(fb, calls: int) -> str:
    """Top host functions over `calls` calls, by own time and by cumulative time."""
    torch.cuda._sleep(1_000_000_000)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fb()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(25)
    return out.getvalue()


def kernel_spread(fb, calls: int) -> str:
    """min / median / max GPU time of each kernel over `calls` back-to-back calls (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fb()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start:
            times.setdefault(e.name[:60], []).append(e.time_range.elapsed_us() / 1e3)
    lines = [f"  {spread(v)}  x{len(v):<4d} {k}" for k, v in sorted(times.items(), key=lambda kv: -sum(kv[1]))]
    return "\n".join(lines[:12])


def fwd_bwd(backend: str, leaves: list[torch.Tensor], counts_E: torch.Tensor, row_idx_S: torch.Tensor,
            gate_S: torch.Tensor, T: int, dy: torch.Tensor):
    """One forward+backward of `backend`, as bench_experts.py times it."""

    def fb():
        out = run_experts(backend, *leaves, counts_E, row_idx_S, gate_S, T)
        return torch.autograd.grad(out, [*leaves, gate_S], dy)

    return fb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="dsv3_16b,qwen3_30b_a3b")
    ap.add_argument("--backends", default="triton,grouped_mm")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the backends, to see drift")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N", help="also cProfile N host calls per backend")
    ap.add_argument("--per-kernel", type=int, default=0, metavar="N",
                    help="also each kernel's GPU time spread over N back-to-back calls per backend")
    args = ap.parse_args()
    shapes = names_among(ap, "--shapes", args.shapes, sorted(SHAPES))
    backends = args.backends.split(",")
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for name in shapes:
        s = SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        x, wg, wu, wd = make_inputs(s, gen, dev)
        row_idx_S, gate_S, counts_E = make_routing(s, "uniform", gen, dev)
        leaves = [t.requires_grad_() for t in (x, wg, wu, wd)]
        gate_S.requires_grad_()
        dy = torch.randn(s.T, s.D, device=dev, generator=gen).to(torch.bfloat16)
        fbs = {b: fwd_bwd(b, leaves, counts_E, row_idx_S, gate_S, s.T, dy) for b in backends}
        for _ in range(args.repeats):
            for backend, fb in fbs.items():
                host, b2b, synced = measure(fb, args.calls)
                print(f"{name} {backend:10s} host/call {spread(host)} | back-to-back {spread(b2b)} | "
                      f"synced {spread(synced)}", flush=True)
        for backend, fb in fbs.items():
            if args.per_kernel:
                print(f"# per-kernel ms {name} {backend}, {args.per_kernel} calls\n"
                      f"{kernel_spread(fb, args.per_kernel)}", flush=True)
            if args.cprofile:
                print(f"# cProfile {name} {backend}, {args.cprofile} calls\n{host_profile(fb, args.cprofile)}",
                      flush=True)


if __name__ == "__main__":
    main()
