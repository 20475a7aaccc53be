"""What observability costs: the same training run with every metric on and with them off, one process, one GPU.

    python benchmarks/bench_metrics_overhead.py --model deepseek_small --steps 60 --repeats 3

"on":  the defaults: logger.timing=true (CUDA events around the experts), wandb offline, metrics logged
       every step, pictures and the load histogram every logger.plot_every (500) steps and at the last
       step, alerts on. With fewer than 500 steps the last step's pictures fall inside the timed
       iterations, amortised over --steps rather than 500: an overestimate.
"off": logger.timing=false, wandb disabled, one metrics.jsonl row (the last step), no pictures, no alerts.
--variants adds named override sets (each on top of "off") to split the cost into its parts.
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


VARIANTS: dict[str, list[str]] = {
    "off": ["logger.timing=false", "logger.wandb.mode=disabled", "train.log_every=100000", "logger.plot_every=0",
            "logger.alerts.enabled=false"],
    "on": ["logger.timing=true", "logger.wandb.mode=offline", "train.log_every=1", "logger.alerts.enabled=true"],
}
"""Named override sets; each variant is applied on top of "off". --variants adds "name=k=v,k=v" ones."""


def make_job(args, variant: str, run_dir: str):
    from tests.conftest import job_from

    common = [
        f"model={args.model}", "data=synthetic", "logger.progress_bar=false", f"train.steps={args.steps}",
        f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}",
        f"train.seq_len={args.seq_len}", "train.eval_every=0", "train.warmup_steps=5",
        f"cluster.use_gpu={str(args.cpu is False).lower()}", f"model.moe.backend={args.backend}",
    ]
    extra = list(VARIANTS["off"])
    extra += [o for o in VARIANTS[variant]]  # later overrides win
    job = job_from(common + extra)
    job.run_dir = run_dir
    return job


class HostClock:
    """Host seconds spent inside the observability calls the loop makes after each step's synchronise
    (the step's GPU work is done by then, so this time adds 1:1 to the iteration): an in-process
    measurement, free of the run-to-run spread that a comparison between two processes has."""

    def __init__(self) -> None:
        self.per_step: list[float] = []
        self.pending = 0.0

    def install(self) -> list:
        from moe.train.observability import Observability

        originals = [(Observability, name, getattr(Observability, name)) for name in ("step_metrics", "publish")]

        def wrap(fn, name: str):
            def timed(obs, *a, **k):
                t = time.perf_counter()
                try:
                    return fn(obs, *a, **k)
                finally:
                    self.pending += time.perf_counter() - t
                    if name == "publish":  # the step's last observability call
                        self.per_step.append(self.pending)
                        self.pending = 0.0
            return timed

        for cls, name, fn in originals:
            setattr(cls, name, wrap(fn, name))
        return originals


def run_once(args, variant: str) -> dict[str, float]:
    from moe.train.loop import train

    stamps: list[float] = []
    clock = HostClock()
    originals = clock.install()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_metrics_") as run_dir:
            train(make_job(args, variant, run_dir), report=lambda _row: stamps.append(time.perf_counter()))
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)
    total = time.perf_counter() - t0
    iters = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    host = clock.per_step[args.warmup + 1:]
    # Setup (model build, wandb start) + first iteration before the first stamp; finish after the last.
    return {"mean": statistics.mean(iters), "median": statistics.median(iters), "max": max(iters),
            "outside_loop_s": total - (stamps[-1] - stamps[0]), "host_mean": statistics.mean(host),
            "host_median": statistics.median(host)}


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
    p.add_argument("--variants", nargs="*", default=[],
                   help='more variants as name=override,override (on top of "off"), e.g. '
                        'log10=logger.timing=true,logger.wandb.mode=offline,train.log_every=10')
    p.add_argument("--cpu", action="store_true", help="run on CPU (a smoke test of the script, not a figure)")
    args = p.parse_args()
    import torch

    if not args.cpu:
        assert torch.cuda.is_available(), "needs one GPU (or --cpu for a smoke test)"
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for spec in args.variants:
        name, _, overrides = spec.partition("=")
        VARIANTS[name] = [o for o in overrides.split(",") if o]
    names = ["off", "on"] + [spec.partition("=")[0] for spec in args.variants]
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:  # alternate, so drift hits every variant alike
            res = run_once(args, name)
            results[name].append(res)
            print(f"round {r} {name}: mean {res['mean'] * 1e3:.2f} ms/iter, median {res['median'] * 1e3:.2f} ms, "
                  f"slowest {res['max'] * 1e3:.0f} ms, in observability calls {res['host_mean'] * 1e3:.2f} ms mean "
                  f"({res['host_median'] * 1e3:.2f} median), outside the loop {res['outside_loop_s']:.1f} s", flush=True)
    print(f"model={args.model} seq_len={args.seq_len} global_batch={args.global_batch} micro_batch={args.micro_batch} "
          f"steps={args.steps} (first {args.warmup} dropped)")
    print("| variant | overrides on top of off | mean overhead | median overhead | rounds (mean) | host time in "
          "observability calls, mean (median) per iteration, % of the off median |")
    print("|---|---|---|---|---|---|")
    for name in names[1:]:
        means = [100 * (v["mean"] / o["mean"] - 1) for v, o in zip(results[name], results["off"])]
        medians = [100 * (v["median"] / o["median"] - 1) for v, o in zip(results[name], results["off"])]
        host_mean = [100 * (v["host_mean"] - o["host_mean"]) / o["median"] for v, o in zip(results[name], results["off"])]
        host_median = [100 * (v["host_median"] - o["host_median"]) / o["median"]
                       for v, o in zip(results[name], results["off"])]
        print(f"| {name} | {' '.join(VARIANTS[name])} | {statistics.median(means):+.2f}% | "
              f"{statistics.median(medians):+.2f}% | {', '.join(f'{m:+.1f}%' for m in means)} | "
              f"{statistics.median(host_mean):.2f}% ({statistics.median(host_median):.2f}%) |")

if __name__ == "__main__":
    main()
