"""Where a training step's time goes: one process, one GPU, a few steady-state steps under the torch
profiler (CPU ops and GPU kernels) and cProfile (Python host time) together.

    python3 benchmarks/profile_train_step.py [--skip 8] [--active 4] model=deepseek_small train.seq_len=128

Arguments after the options are launcher overrides (data=synthetic, wandb disabled, no eval and GPU are
preset). Prints the wall time of each profiled step, the GPU kernel time in them, and the top entries
of each profile. When kernel time is far below wall time the step is bound by the host, and the
cProfile table says by what.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESET = ["data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false", "logger.plot_every=0",
          "train.eval_every=0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip", type=int, default=8, help="steps before profiling (autotuning, allocator growth)")
    p.add_argument("--active", type=int, default=4, help="steps profiled")
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (host profile only; a smoke test)")
    args, overrides = p.parse_known_args()
    if args.skip < 1 or args.active < 1:
        p.error(f"--skip={args.skip}, --active={args.active}: both must be >= 1")
    if bad := [a for a in overrides if "=" not in a or a.startswith("-")]:
        p.error(f"unknown arguments {bad}: extra arguments are launcher overrides key=value")
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        p.error("no GPU here: --cpu profiles a CPU run")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    from moe.train.loop import train
    from tests.conftest import job_from

    job = job_from([*PRESET, f"cluster.use_gpu={str(gpu).lower()}", *overrides, f"train.steps={args.skip + args.active}"])
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else []))
    host = cProfile.Profile()
    stamps: list[float] = []

    def report(row: dict) -> None:  # after each step, on the logging rank (the only one here)
        stamps.append(time.perf_counter())
        if row["step"] == args.skip - 1:
            sync()
            prof.start()
            host.enable()
        elif row["step"] == args.skip + args.active - 1:
            host.disable()
            sync()
            prof.stop()

    with tempfile.TemporaryDirectory(prefix="profile_step_") as run_dir:
        job.run_dir = run_dir
        train(job, report=report)
    walls_ms = [1e3 * (b - a) for a, b in zip(stamps[args.skip - 1:], stamps[args.skip:])]
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"{torch.cuda.get_device_name() if gpu else 'CPU'}, torch {torch.__version__}; overrides: {' '.join(overrides)}")
    print(f"profiled steps {args.skip}..{args.skip + args.active - 1}: wall ms "
          f"{', '.join(f'{w:.1f}' for w in walls_ms)}; GPU kernel time {kernel_us / 1e3 / args.active:.1f} ms per step")
    if gpu:
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    out = io.StringIO()
    pstats.Stats(host, stream=out).sort_stats("tottime").print_stats(args.rows)
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(host, stream=out).sort_stats("cumulative").print_stats(args.rows)
    print(out.getvalue())


if __name__ == "__main__":
    main()
