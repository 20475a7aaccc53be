"""End-to-end training throughput of each routed-expert backend, through the real launcher.

The expert benchmark (bench_experts.py) times one MoE layer; this runs `python -m launcher` on one GPU
for each `model.moe.backend` with the same model, data, seed and batch, and reports what a user sees:
median tokens/s and MFU after the first steps, peak memory, the share of step time in the experts,
and how far the losses of the backends drift apart (bf16: rounding, not equality).

    python3 benchmarks/bench_train_backends.py --out /tmp/train_backends [--backends triton,grouped_mm]
        [--steps 30] [--base NAME] [launcher overrides ...]

A name with `+graphs` (`triton+graphs`, `grouped_mm+graphs`) runs that backend with
train.cuda_graphs=true: against its eager run it measures what the CUDA graph saves.

Each backend's run dir (metrics.jsonl, summary.json, the launcher's log) is kept under --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_experts import names_among

BACKENDS = ("triton", "grouped_mm", "torch")
VARIANTS = BACKENDS + ("triton+graphs", "grouped_mm+graphs")  # the torch backend syncs: no graph
# deepseek_small at the batch of the TMA section of BENCHMARKS.md: 131072 routed rows per MoE layer.
# lr 1e-3: at the default 3e-3 this batch and data spike (loss 7.1 -> 8.2 at step 30 on an H200), and
# after a spike the backends' bf16 rounding differences grow into different curves.
DEFAULT = ["model=deepseek_small", "data=synthetic", "cluster.use_gpu=true", "cluster.num_workers=1",
           "train.seq_len=2048", "train.global_batch_size=16", "train.micro_batch_size=16", "train.lr=1e-3",
           "train.eval_every=0",
           "logger.wandb.mode=disabled", "logger.progress_bar=false", "logger.plot_every=0"]
SKIP = 5  # the first steps hold Triton's autotuning and the allocator's growth


def run_one(name: str, steps: int, extra: list[str], run_dir: Path) -> dict:
    backend, graphs = name.removesuffix("+graphs"), name.endswith("+graphs")
    cmd = [sys.executable, "-m", "launcher", *DEFAULT, f"train.steps={steps}", f"model.moe.backend={backend}",
           *extra, *(["train.cuda_graphs=true"] if graphs else []), f"hydra.run.dir={run_dir}"]
    started = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "launcher.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"{name}: the launcher exited with {res.returncode}\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] >= SKIP] or rows
    expert_share = [r["perf/expert_compute_time_s"] / r["step_time_s"] for r in timed
                    if r.get("perf/expert_compute_time_s") is not None]
    return {
        "backend": name, "wall_s": time.monotonic() - started, "losses": [r["loss"] for r in rows],
        "grad_norms": [r["grad_norm"] for r in rows],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["perf/mfu"] for r in timed) if timed[0].get("perf/mfu") is not None else None,
        "step_ms": 1e3 * statistics.median(r["step_time_s"] for r in timed),
        "max_memory_gib": max(r.get("max_memory_gib") or 0.0 for r in rows),
        "expert_share": statistics.median(expert_share) if expert_share else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the run dirs and results.json")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, among {', '.join(VARIANTS)}")
    p.add_argument("--base", default="", help="the run the ratios are against (default grouped_mm if run, else "
                   "the first of --backends)")
    p.add_argument("--steps", type=int, default=30, help=f"training steps per backend (> {SKIP})")
    p.add_argument("--repeats", type=int, default=1, help="runs per backend, the backends taking turns")
    args, extra = p.parse_known_args()
    backends = names_among(p, "--backends", args.backends, VARIANTS)
    if args.base and args.base not in backends:
        p.error(f"--base={args.base!r}: must be one of the runs in --backends ({', '.join(backends)})")
    if args.steps <= SKIP:
        p.error(f"--steps={args.steps}: must be > {SKIP}, the untimed first steps")
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats}: must be >= 1")
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        p.error(f"unknown arguments {bad}: extra arguments are launcher overrides key=value")
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for i in range(args.repeats):
        for b in backends:
            r = run_one(b, args.steps, extra, args.out / f"{b}_{i}")
            runs[b].append(r)
            print(f"{b} run {i}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_ms']:.1f} ms, "
                  f"wall {r['wall_s']:.0f} s", flush=True)
    # Per backend, the run of median throughput stands for it (the first, with one repeat).
    results = [sorted(rs, key=lambda r: r["tokens_per_s"])[(len(rs) - 1) // 2] for rs in runs.values()]
    base_name = args.base or ("grouped_mm" if "grouped_mm" in backends else backends[0])
    base = next(r for r in results if r["backend"] == base_name)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"\n{device}, torch {torch.__version__}; extra overrides: {' '.join(extra) or 'none'}; "
          f"steps {SKIP}..{args.steps - 1}, medians; ratios against {base['backend']}")
    print("| backend | tokens/s (each run) | vs base | step ms | MFU | expert share of step | peak GiB | "
          "loss diff vs base, steps 0-9 / all | last loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"])]
        each = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in runs[r["backend"]])
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        share = f"{100 * r['expert_share']:.0f}%" if r["expert_share"] is not None else "-"
        print(f"| {r['backend']} | {r['tokens_per_s']:,.0f} ({each}) | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{r['step_ms']:.1f} | {mfu} | {share} | {r['max_memory_gib']:.1f} | "
              f"{max(diffs[:10]):.1e} / {max(diffs):.1e} | {r['losses'][-1]:.3f} |")
    for b, rs in runs.items():
        if len(rs) > 1:
            print(f"{b}, {len(rs)} runs: {reproducibility(rs)}")
    (args.out / "results.json").write_text(json.dumps(runs, indent=1))


def first_difference(a: dict, b: dict) -> int | None:
    """The first step at which two runs' loss or gradient norm differ in any bit; None if none does."""
    for step, pair in enumerate(zip(zip(a["losses"], a["grad_norms"]), zip(b["losses"], b["grad_norms"]))):
        if pair[0] != pair[1]:
            return step
    return None


def reproducibility(rs: list[dict]) -> str:
    """How far runs of the same config agree: bitwise through which step, and the largest loss drift."""
    firsts = [first_difference(rs[0], r) for r in rs[1:]]
    drift = max(abs(x - y) / abs(y) for r in rs[1:] for x, y in zip(r["losses"], rs[0]["losses"]))
    if all(f is None for f in firsts):
        return f"loss and grad_norm bitwise equal at all {len(rs[0]['losses'])} steps"
    first = min(f for f in firsts if f is not None)
    return f"first step where loss or grad_norm differ: {first}; largest relative loss difference {drift:.1e}"


if __name__ == "__main__":
    main()
