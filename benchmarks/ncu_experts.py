"""One forward+backward of a benchmark layer inside a profiler range, for Nsight Compute's counters.

    ncu --profile-from-start off --kernel-name regex:gate_up_fwd --metrics <...> \
        python3 benchmarks/ncu_experts.py --shape fine_grained --skew uniform

The kernels are autotuned (and compiled) in warm-up passes outside the range, so ncu sees only the
measured pass. Prints the chosen configs, so the counters can be read against them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_experts import (  # noqa: E402
    SHAPES,
    make_inputs,
    make_routing,
    print_autotune_choices,
    run_experts,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="fine_grained", choices=sorted(SHAPES))
    ap.add_argument("--skew", default="uniform", help="uniform, zipf or balanced (see bench_experts)")
    ap.add_argument("--backend", default="triton")
    args = ap.parse_args()
    s = SHAPES[args.shape]
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    leaves = [t.requires_grad_() for t in make_inputs(s, gen, device)]
    row_idx_S, gate_S, counts_E = make_routing(s, args.skew, gen, device)
    gate_S.requires_grad_()
    dy = torch.randn(s.T, s.D, device=device, generator=gen).to(torch.bfloat16)

    def step():
        out = run_experts(args.backend, *leaves, counts_E, row_idx_S, gate_S, s.T)
        return torch.autograd.grad(out, [*leaves, gate_S], dy)

    for _ in range(2):  # autotune, compile, warm the caches
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print_autotune_choices()
    print(f"# {args.shape} {args.skew}: max rows/expert {int(counts_E.max())}, "
          f"row blocks of 128: {int(((counts_E + 127) // 128).sum())}", flush=True)


if __name__ == "__main__":
    main()
