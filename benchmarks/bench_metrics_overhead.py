"""What observability costs: the same training run with every metric on and with them off, one process, one GPU.

    python benchmarks/bench_metrics_overhead.py --model deepseek_small --steps 60 --repeats 3

"on":  logger.timing=true (CUDA events around the experts), wandb offline, metrics logged every step,
       pictures and the load histogram every `--plot-every` steps, alerts on.
"off": logger.timing=false, wandb disabled, one metrics.jsonl row (the last step), no pictures, no alerts.
Both still compute the load metrics every step (the expert-bias update needs the same global counts),
so this measures what the issue-6 additions cost on top of the bare loop.

Time per iteration = the wall time between consecutive progress reports from the loop, so it includes
everything after the step too (logging, wandb, pictures, alerts), not just the step's own timer. The
first `--warmup` iterations are dropped; the mean (pictures amortised) and the median are printed.
"on" and "off" runs alternate `--repeats` times so that clock or thermal drift hits both alike.
The wandb service start and final flush happen outside the loop and are printed separately.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_job(args, on: bool, run_dir: str):
    from tests.conftest import job_from

    common = [
        f"model={args.model}", "data=synthetic", "logger.progress_bar=false", f"train.steps={args.steps}",
        f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}",
        f"train.seq_len={args.seq_len}", "train.eval_every=0", "train.warmup_steps=5",
        f"cluster.use_gpu={str(args.cpu is False).lower()}", f"model.moe.backend={args.backend}",
    ]
    if on:
        extra = ["logger.timing=true", "logger.wandb.mode=offline", "train.log_every=1",
                 f"logger.plot_every={args.plot_every}", "logger.alerts.enabled=true"]
    else:
        extra = ["logger.timing=false", "logger.wandb.mode=disabled", f"train.log_every={args.steps}",
                 "logger.plot_every=0", "logger.alerts.enabled=false"]
    job = job_from(common + extra)
    job.run_dir = run_dir
    return job


def run_once(args, on: bool) -> dict[str, float]:
    from moe.train.loop import train

    stamps: list[float] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as run_dir:
        train(make_job(args, on, run_dir), report=lambda _row: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    iters = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    # Setup (model build, wandb start) + first iteration before the first stamp; finish after the last.
    return {"mean": statistics.mean(iters), "median": statistics.median(iters),
            "outside_loop_s": total - (stamps[-1] - stamps[0])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="deepseek_small")
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--plot-every", type=int, default=50)
    p.add_argument("--cpu", action="store_true", help="run on CPU (a smoke test of the script, not a figure)")
    args = p.parse_args()
    import torch

    if not args.cpu:
        assert torch.cuda.is_available(), "needs one GPU (or --cpu for a smoke test)"
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for r in range(args.repeats):
        for on in (False, True):
            res = run_once(args, on)
            results[on].append(res)
            print(f"round {r} metrics {'on ' if on else 'off'}: mean {res['mean'] * 1e3:.2f} ms/iter, "
                  f"median {res['median'] * 1e3:.2f} ms, outside the loop {res['outside_loop_s']:.1f} s", flush=True)
    overheads = [100 * (on["mean"] / off["mean"] - 1) for on, off in zip(results[True], results[False])]
    medians = [100 * (on["median"] / off["median"] - 1) for on, off in zip(results[True], results[False])]
    print(f"model={args.model} seq_len={args.seq_len} global_batch={args.global_batch} micro_batch={args.micro_batch} "
          f"steps={args.steps} (first {args.warmup} dropped) plot_every={args.plot_every}")
    print(f"metrics overhead per iteration (mean, pictures amortised): {statistics.median(overheads):+.2f}% "
          f"(rounds: {', '.join(f'{o:+.2f}%' for o in overheads)})")
    print(f"metrics overhead per iteration (median iteration): {statistics.median(medians):+.2f}% "
          f"(rounds: {', '.join(f'{o:+.2f}%' for o in medians)})")


if __name__ == "__main__":
    main()
