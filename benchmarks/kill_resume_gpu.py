"""Kill a GPU worker mid-run, resume from the last checkpoint, compare with an uninterrupted run.

    NCCL_NVLS_ENABLE=0 python benchmarks/kill_resume_gpu.py --steps 20 --kill-step 7 --checkpoint-every 5
        [--world 1|2] [--deterministic]

--world 2 (default): dp=2 x ep=2 on two GPUs; --world 1: one GPU. --deterministic sets
train.deterministic=true, under which the resumed run must equal the reference bit for bit.

No Ray: each rank is a spawned process that calls moe.train.worker.run_worker (the function the Ray
actors call), on its own GPU, NCCL, bf16 autocast. Runs:
1. reference: uninterrupted, checkpoints every --checkpoint-every steps;
2. noise floor (skip with --no-noise-floor): the same again, to show run-to-run differences of the
   GPU kernels and NCCL reductions (bf16 runs need not be bit-identical even without any failure);
3. killed: rank 1 SIGKILLs itself at --kill-step (--kill-where, via the test-only MOE_TEST_FAULT hook);
   this script then stops the surviving rank, as the launcher's driver does, and starts both ranks
   again on the same run dir; they resume from the newest complete checkpoint (train.resume=auto).
Prints the per-step losses, whether they are bit-identical, and the largest relative loss difference
of the resumed run and of the noise floor against the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time

import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_job(args, run_dir: str):
    from tests.conftest import job_from

    job = job_from([
        f"model={args.model}", "data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false",
        f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}", f"train.seq_len={args.seq_len}", "train.eval_every=0",
        "train.warmup_steps=5", f"cluster.use_gpu={not args.cpu}", f"train.dtype={'auto' if args.cpu else 'bf16'}",
        f"model.moe.backend={'auto' if args.cpu else args.backend}",
        f"train.lr={args.lr}", f"train.checkpoint_every={args.checkpoint_every}", "train.keep_checkpoints=10",
        f"parallel.dp={args.world}", f"parallel.ep={args.world}", f"cluster.num_workers={args.world}",
        f"parallel.timeout_s={args.timeout_s}", "logger.plot_every=0", f"train.deterministic={args.deterministic}",
    ])
    job.run_dir = run_dir
    return job


def _rank(rank: int, port: int, args, run_dir: str, fault: str | None) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # each worker sees its own GPU as cuda:0, as under Ray
    if args.cpu:
        import torch

        torch.set_num_threads(1)  # as the launcher does per CPU slot; CPU reductions then repeat exactly
    os.environ.pop("MOE_TEST_FAULT", None)
    if fault:
        os.environ["MOE_TEST_FAULT"] = fault
    from moe.train.worker import run_worker

    summary = run_worker(make_job(args, run_dir), rank, args.world, "127.0.0.1", port, [0] * args.world)
    with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)


def attempt(args, run_dir: str, fault: str | None = None) -> bool:
    """Run both ranks; True when both finished. When one dies, stop the other (it may wait in NCCL until
    parallel.timeout_s otherwise), as the driver does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, port, args, run_dir, fault)) for r in range(args.world)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            time.sleep(2)  # let the survivor print its error
            for p in procs:
                if p.is_alive():
                    p.kill()
            break
        time.sleep(0.5)
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    print(f"  exit codes {codes}", flush=True)
    return all(c == 0 for c in codes)


def run(args, name: str, fault: str | None = None) -> dict:
    run_dir = os.path.join(args.out, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    print(f"{name}: {'with fault ' + fault if fault else 'uninterrupted'}", flush=True)
    if not attempt(args, run_dir, fault):
        if fault is None:
            raise SystemExit(f"{name} failed without a fault; see the errors above")
        print(f"{name}: restarting the workers on {run_dir} (train.resume=auto)", flush=True)
        if not attempt(args, run_dir):
            raise SystemExit(f"{name}: the resumed attempt failed; see the errors above")
    return json.load(open(os.path.join(run_dir, "rank0.json")))


def compare(name: str, got: dict, ref: dict) -> float:
    a, b = got["losses"], ref["losses"]
    assert len(a) == len(b), f"{name}: {len(a)} losses, reference {len(b)}"
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    same = sum(x.hex() == y.hex() for x, y in zip(a, b))
    same_gn = sum(x.hex() == y.hex() for x, y in zip(got["grad_norms"], ref["grad_norms"]))
    print(f"{name}: max relative loss difference {worst:.3e}; bit-identical losses {same}/{len(a)}, "
          f"grad norms {same_gn}/{len(a)}")
    return worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="deepseek_small")
    p.add_argument("--backend", default="grouped_mm")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--kill-step", type=int, default=7)
    p.add_argument("--kill-where", default="before_optimizer", choices=["before_optimizer", "during_checkpoint",
                                                                         "step_start", "all_to_all"])
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--timeout-s", type=int, default=120)
    p.add_argument("--no-noise-floor", action="store_true")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU in fp32: a quick check of this script itself")
    p.add_argument("--world", type=int, default=2, choices=[1, 2], help="workers (GPUs), each dp and ep")
    p.add_argument("--deterministic", action="store_true", help="train.deterministic=true")
    p.add_argument("--out", default="/tmp/kill_resume_gpu")
    args = p.parse_args()
    if args.world == 1 and args.kill_where == "all_to_all":
        p.error("--kill-where=all_to_all needs --world 2: one worker has no all-to-all to die in")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.makedirs(args.out, exist_ok=True)

    ref = run(args, "reference")
    again = None if args.no_noise_floor else run(args, "noise_floor")
    killed = run(args, "killed", f"kill:rank={args.world - 1}:step={args.kill_step}:where={args.kill_where}")
    print("| step | reference | resumed | rel diff |")
    print("|---|---|---|---|")
    for step, (a, b) in enumerate(zip(ref["losses"], killed["losses"])):
        print(f"| {step} | {a:.6f} | {b:.6f} | {abs(a - b) / abs(a):.2e} |")
    print(f"resumed run: attempt 2 started at step {killed['start_step']} from {killed['resumed_from']}")
    if again is not None:
        compare("noise floor (second uninterrupted run)", again, ref)
    worst = compare("killed and resumed", killed, ref)
    print(f"max relative loss difference, kill at step {args.kill_step} ({args.kill_where}) and resume vs "
          f"uninterrupted, {args.steps} steps {'fp32 on CPU' if args.cpu else 'bf16'} with {args.world} worker(s)"
          f"{', deterministic' if args.deterministic else ''}: {worst:.3e}")


if __name__ == "__main__":
    main()
