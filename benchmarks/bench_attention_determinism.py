"""Which SDPA kernel the model's attention runs, with and without `train.deterministic`, whether its
backward repeats bit for bit, and what determinism costs there.

The attention core of deepseek_small (MLA: q/k heads of 96, v heads of 64) at its training shape,
bf16, fwd+bwd: the model's `CausalAttention` (which pads v to one head size under deterministic
mode, for flash attention) and bare SDPA on the same tensors; then bare SDPA on heads of one size
(64). For each mode: the CUDA kernels the profiler saw, the median time of a fwd+bwd, and whether
`--repeats` backward passes gave identical gradients.

    python3 benchmarks/bench_attention_determinism.py [--batch 16] [--seq 2048] [--repeats 10]
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from moe.model.attention import CausalAttention
from moe.train.determinism import deterministic_mode


def bare_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


ATTENTION_KERNELS = ("attention", "fmha", "flash", "cudnn")  # name parts of the SDPA backends' kernels


def measure(name: str, core: Callable[..., torch.Tensor], qk: int, vd: int, args: argparse.Namespace,
            deterministic: bool) -> dict:
    def fwd_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(core(q, k, v), (q, k, v), dy)

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.heads, args.seq)
    q, k = (torch.randn(*shape, qk, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(2))
    v = torch.randn(*shape, vd, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    dy = torch.randn(*shape, vd, device="cuda", dtype=torch.bfloat16, generator=gen)
    with deterministic_mode(deterministic):
        first = fwd_bwd(q, k, v, dy)
        same = True
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            again = fwd_bwd(q, k, v, dy)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            same = same and all(torch.equal(a, b) for a, b in zip(first, again))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd_bwd(q, k, v, dy)
            torch.cuda.synchronize()
    kernels = sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ATTENTION_KERNELS)})
    return {"core": name, "deterministic": deterministic, "ms": statistics.median(times), "same": same,
            "kernels": kernels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10, help="timed fwd+bwd calls, each compared with the first")
    args = p.parse_args()
    for n in ("batch", "heads", "seq", "repeats"):
        if getattr(args, n) < 1:
            p.error(f"--{n}={getattr(args, n)}: must be >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {args.batch}, heads {args.heads}, "
          f"seq {args.seq}, bf16, causal")
    print("| core | train.deterministic | fwd+bwd ms | gradients equal in all repeats | kernels |")
    print("|---|---|---|---|---|")
    model_core = CausalAttention()
    for name, core, qk, vd in (("model, mla (qk 96, v 64)", model_core, 96, 64),
                               ("bare SDPA, mla (qk 96, v 64)", bare_sdpa, 96, 64),
                               ("bare SDPA, equal heads (64)", bare_sdpa, 64, 64)):
        rows = [measure(name, core, qk, vd, args, det) for det in (False, True)]
        for r in rows:
            print(f"| {r['core']} | {r['deterministic']} | {r['ms']:.3f} | {r['same']} | {'; '.join(r['kernels'])[:300]} |")


if __name__ == "__main__":
    main()
