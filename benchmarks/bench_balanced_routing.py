"""The imbalance tax: the same training with the router's real choices and with round-robin routing.

    python benchmarks/bench_balanced_routing.py --model deepseek_small --steps 40            # one GPU
    NCCL_NVLS_ENABLE=0 python benchmarks/bench_balanced_routing.py --gpus 2 --ep 2 --steps 40

`train.force_balanced_routing=true` replaces the router's top-k by round-robin with the same shapes
(T tokens x top_k, the router's gate weights), so both runs do the same FLOPs and move the same number
of rows; only the distribution over experts (and so over EP ranks) differs. Prints both runs' median
tokens/s (after the first three steps) and real / balanced: 1.0 means imbalance costs nothing, 0.8 means
real routing runs at 80% of the balanced speed. The real run's mean overload factor, rank overload
factor and imbalance wait are printed next to it so the tax can be read against the imbalance.

Note: routing on an untrained model with the expert-bias update is close to balanced; `--skew` makes
the real run's router prefer low-numbered experts (a fixed offset on the selection bias, so it needs
`model.moe.router.use_expert_bias=true`, as the deepseek presets have; the bias update then fights it).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys

import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_job(args, balanced: bool, run_dir: str):
    from tests.conftest import job_from

    job = job_from([
        f"model={args.model}", "data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false",
        "logger.plot_every=0", f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}", f"train.seq_len={args.seq_len}", "train.eval_every=0",
        "train.warmup_steps=5", f"cluster.use_gpu={str(not args.cpu).lower()}", f"model.moe.backend={args.backend}",
        f"parallel.dp={args.gpus}", f"parallel.ep={args.ep}", f"cluster.num_workers={args.gpus}",
        f"train.force_balanced_routing={str(balanced).lower()}",
    ])
    job.run_dir = run_dir
    return job


def _skew_router(strength: float) -> None:
    """Add a fixed logit bias favouring low-numbered experts (real run only)."""
    import torch

    import moe.model.router as router_mod

    original = router_mod.Router.forward

    def skewed(self, x_TD, seq_len):
        if not hasattr(self, "_bench_skew"):
            bias = -strength * torch.arange(self.num_experts, dtype=torch.float32) / self.num_experts
            self._bench_skew = bias.to(self.weight.device)
        with torch.no_grad():
            self.expert_bias.add_(self._bench_skew)
        try:
            return original(self, x_TD, seq_len)
        finally:
            with torch.no_grad():
                self.expert_bias.sub_(self._bench_skew)

    router_mod.Router.forward = skewed


def _child(rank: int, world: int, port: int, args, balanced: bool, out_dir: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # each worker sees its own GPU as cuda:0, as under Ray
    if args.skew > 0 and not balanced:
        _skew_router(args.skew)
    from moe.train.worker import run_worker

    summary = run_worker(make_job(args, balanced, out_dir), rank, world, "127.0.0.1", port)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)


def run(args, balanced: bool) -> tuple[dict, list[dict]]:
    out_dir = os.path.join(args.out, "balanced" if balanced else "real")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        os.remove(os.path.join(out_dir, "metrics.jsonl"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_child, args=(args.gpus, port, args, balanced, out_dir), nprocs=args.gpus)
    summary = json.load(open(os.path.join(out_dir, "rank0.json")))
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return summary, rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--model", default="deepseek_small")
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--skew", type=float, default=0.0, help="logit bias range favouring low experts (real run)")
    p.add_argument("--out", default="/tmp/bench_balanced_routing")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU: a smoke test of the script, not a figure")
    args = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    args.global_batch = max(args.global_batch, args.micro_batch * args.gpus)

    real, real_rows = run(args, balanced=False)
    bal, bal_rows = run(args, balanced=True)
    tail = real_rows[3:] or real_rows

    def mean(key: str, rows: list[dict]) -> float:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.mean(values) if values else float("nan")

    print(f"model={args.model} gpus={args.gpus} ep={args.ep} seq_len={args.seq_len} global_batch={args.global_batch} "
          f"micro_batch={args.micro_batch} steps={args.steps} skew={args.skew}")
    print(f"real routing:     {real['median_tokens_per_s']:.0f} tokens/s (all GPUs), overload factor "
          f"{mean('moe/overload_factor', tail):.2f}, rank overload {mean('moe/rank_overload_factor', tail):.2f}, "
          f"imbalance wait {mean('moe/imbalance_wait_s', tail) * 1e3:.2f} ms/step, "
          f"expert time {mean('perf/expert_compute_time_s', tail) * 1e3:.2f} ms/step")
    print(f"balanced routing: {bal['median_tokens_per_s']:.0f} tokens/s (all GPUs), overload factor "
          f"{mean('moe/overload_factor', bal_rows[3:] or bal_rows):.2f}, "
          f"expert time {mean('perf/expert_compute_time_s', bal_rows[3:] or bal_rows) * 1e3:.2f} ms/step")
    ratio = real["median_tokens_per_s"] / bal["median_tokens_per_s"]
    print(f"throughput ratio real / balanced: {ratio:.3f} (imbalance tax {100 * (1 - ratio):.1f}%)")


if __name__ == "__main__":
    main()
