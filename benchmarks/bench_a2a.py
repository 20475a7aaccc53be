"""Dispatch+combine of the project's all-to-all path against bare all_to_all_single of the same bytes.

One process per GPU (NCCL), run in one go:
    NCCL_NVLS_ENABLE=0 python benchmarks/bench_a2a.py --gpus 2
For each size, tokens are routed uniformly at random (top-k over E experts, hidden 7168, bf16). The
project's path (count exchange and check, gather into the send buffer, uneven all-to-all, regroup by
local expert, return all-to-all, weighted combine) runs with identity experts so only data movement is
timed, in three variants: the default dropless path (experts that take the regroup as an index, as the
Triton kernel does; single-pass Triton combine), the same with copies and the torch combine, and the
capacity path (keep mask). The baseline is two bare `all_to_all_single` calls with the same split
sizes (dispatch + combine); with --backward also four (forward and backward).
Bandwidth counts the bytes that cross ranks, per rank.

With --expert-ffn F the experts are the Triton SwiGLU kernels, and a variant's data-movement time is
its layer time less the experts' time alone on the same rows: the P2P path's experts write into the
buffers peers read, which identity experts cannot show.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class IdentityExperts(torch.nn.Module):
    """Experts that return their input: only data movement is timed. `gathers_rows` says whether they
    take the regroup permutation as an index (as the Triton kernel does, reading rows in place and
    writing results in arrival order) or want the rows copied into expert order first."""

    num_experts = 0

    def __init__(self, gathers_rows: bool) -> None:
        super().__init__()
        self.gathers_rows = gathers_rows

    def forward(self, x, tokens_per_expert_E, row_idx_S=None, gate_S=None, num_out_rows=None, out=None, **unused):
        # The P2P path hands the experts the gates (they apply them; the combine only sums) and a buffer
        # for their output. Writing x * gate there is one pass over the rows that the NCCL path's
        # identity does not pay, so the P2P figures are conservative; a real expert writes its output
        # anyway (see --expert-ffn).
        if gate_S is None:
            return x
        if out is None:
            return x * gate_S.to(x.dtype).unsqueeze(-1)
        return _GatedCopy.apply(x, gate_S, out)


class _GatedCopy(torch.autograd.Function):
    """out = x * gate, written into the given buffer (the identity expert of the P2P path)."""

    @staticmethod
    def forward(ctx, x, gate, out):
        torch.mul(x, gate.to(x.dtype).unsqueeze(-1), out=out)
        ctx.save_for_backward(x, gate)
        return out  # an unmarked input comes back as a view of it: same memory, this function's grad

    @staticmethod
    def backward(ctx, dout):
        x, gate = ctx.saved_tensors
        dgate = (dout.float() * x.float()).sum(-1).to(gate.dtype)
        return dout * gate.to(dout.dtype).unsqueeze(-1), dgate, None


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    from moe.parallel.expert_parallel import AllToAllDispatcher

    import moe.parallel.permute as permute

    E, K, D = args.experts, args.top_k, args.hidden
    row_bytes = D * 2
    disp = AllToAllDispatcher(dist.group.WORLD, world, rank, E, layer_id=0)
    # (column, keep mask or dropless, experts take the regroup as an index, Triton row kernels, transport)
    variants = [("ours (dropless, nccl)", False, True, "auto", "nccl"),
                ("ours (dropless, p2p)", False, False, "auto", "p2p"),
                ("dropless, copies, torch combine", False, False, "off", "nccl"),
                ("capacity path", True, False, "auto", "nccl")]
    if args.variants:
        variants = [v for v in variants if any(w in v[0] for w in args.variants.split(","))]
    if rank == 0:
        cols = " | ".join(f"{name} GB/s | ratio" for name, *_ in variants)
        print(f"| MiB sent per rank (cross-rank) | tokens | pass | bare a2a GB/s | {cols} |")
        print("|---|---|---|---|" + "---|---|" * len(variants))
    real_experts = None  # the same weights for every size
    if args.expert_ffn:
        from moe.model.dispatch import GroupedExperts

        real_experts = GroupedExperts(E // world, D, args.expert_ffn, backend="triton").cuda().to(torch.bfloat16)
        for w in real_experts.parameters():
            w.data.normal_(0, D ** -0.5)
    for mib in args.sizes:
        # cross-rank bytes per rank = T*K*(1-1/world)*row_bytes (uniform) -> choose T
        T = int(mib * 2**20 / (K * (1 - 1 / world) * row_bytes))
        g = torch.Generator(device="cuda").manual_seed(rank)
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        idx = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices
        gate = torch.rand(T, K, device="cuda")

        def make(capacity: bool, gathers_rows: bool, kernels: str, comm: str, backward: bool):
            experts = real_experts if real_experts is not None else IdentityExperts(gathers_rows)
            keep = torch.ones_like(idx, dtype=torch.bool) if capacity else None
            xg = x.detach().requires_grad_(backward)
            gg = gate.detach().requires_grad_(backward)

            def run():
                permute.ROW_KERNELS = kernels
                disp.comm = comm
                out = disp.run(xg, idx, gg, keep, experts)
                if backward:  # grad, not backward: no accumulation into .grad to time
                    torch.autograd.grad(out, [xg, gg, *experts.parameters()], torch.ones_like(out), allow_unused=True)
            return run

        # Same splits for the baseline: count rows per destination rank once, outside the timing.
        dest = (idx // (E // world)).flatten()
        send = torch.bincount(dest, minlength=world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        send_l, recv_l = send.tolist(), recv.tolist()
        buf_in = torch.randn(sum(send_l), D, device="cuda", dtype=torch.bfloat16)
        buf_out = torch.empty(sum(recv_l), D, device="cuda", dtype=torch.bfloat16)
        back = torch.empty_like(buf_in)

        def bare(times: int):
            def run():
                for _ in range(times):  # dispatch + combine, and their backward passes
                    dist.all_to_all_single(buf_out, buf_in, recv_l, send_l)
                    dist.all_to_all_single(back, buf_out, send_l, recv_l)
            return run

        if real_experts is not None:
            load_E = torch.bincount(idx.flatten(), minlength=E)
            dist.all_reduce(load_E)
            mine_L = load_E[rank * (E // world):(rank + 1) * (E // world)]
            x_alone = torch.randn(int(mine_L.sum()), D, device="cuda", dtype=torch.bfloat16)
            gate_alone = torch.rand(x_alone.shape[0], device="cuda")

            def expert_alone(backward: bool):
                def run():
                    xa = x_alone.detach().requires_grad_(backward)
                    ga = gate_alone.detach().requires_grad_(backward)
                    y = real_experts(xa, mine_L, None, ga)
                    if backward:
                        torch.autograd.grad(y, [xa, ga, *real_experts.parameters()], torch.ones_like(y), allow_unused=True)
                return run

        # The transports must agree before their times mean anything: output and both input gradients.
        got = {}
        for comm in ("nccl", "p2p"):
            disp.comm = comm
            xg, gg = x.detach().requires_grad_(), gate.detach().requires_grad_()
            out = disp.run(xg, idx, gg, None, real_experts if real_experts is not None else IdentityExperts(False))
            out.backward(torch.randn_like(out, generator=torch.Generator(device="cuda").manual_seed(7)))
            got[comm] = (out.detach().float(), xg.grad.float(), gg.grad.float())
        diffs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(got["p2p"], got["nccl"])]
        if rank == 0 or max(diffs) > 1e-2:
            print(f"# rank {rank}, {mib:.0f} MiB: p2p vs nccl max relative difference: out {diffs[0]:.2e}, "
                  f"dx {diffs[1]:.2e}, dgate {diffs[2]:.2e}", flush=True)
        for backward in ([False, True] if args.backward else [False]):
            passes = 2 if backward else 1
            cross = (sum(send_l) - send_l[rank]) * row_bytes * 2 * passes
            t_bare = _time(bare(passes), args.iters)
            # With real experts the data movement is the layer's time less the experts' own time on the
            # same rows (contiguous, gated), measured alone on this rank.
            t_exp = _time(expert_alone(backward), args.iters) if real_experts is not None else 0.0
            if real_experts is not None and rank == 0:
                print(f"# experts alone ({'fwd+bwd' if backward else 'fwd'}): {t_exp * 1e3:.3f} ms", flush=True)
            cells = []
            for _name, capacity, gathers_rows, kernels, comm in variants:
                t = _time(make(capacity, gathers_rows, kernels, comm, backward), args.iters) - t_exp
                cells.append(f"{cross / t / 1e9:.1f} | {t_bare / t:.3f}")
            if rank == 0:
                print(f"| {cross / passes / 2 / 2**20:.0f} | {T} | {'fwd+bwd' if backward else 'fwd'} | "
                      f"{cross / t_bare / 1e9:.1f} | " + " | ".join(cells) + " |", flush=True)
        if args.profile and mib == args.sizes[-1]:
            from torch.profiler import ProfilerActivity, profile

            run = make(False, True, "auto", args.profile, True)
            run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    run()
                torch.cuda.synchronize()
            if rank == 0:
                print(f"== dropless {args.profile}, fwd+bwd, {mib:.0f} MiB, 3 calls: CUDA kernels")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--sizes", type=float, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backward", action="store_true", help="also time forward+backward against 4 bare calls")
    p.add_argument("--profile", default=None, choices=["nccl", "p2p"],
                   help="print the CUDA kernels of the dropless path with this transport")
    p.add_argument("--variants", default="", help="comma-separated substrings of the variant names to run")
    p.add_argument("--expert-ffn", type=int, default=0,
                   help="0: identity experts; F: Triton SwiGLU experts of intermediate size F, whose time alone "
                        "(measured on the same rows) is subtracted from the layer's")
    args = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.gpus, port, args), nprocs=args.gpus)


if __name__ == "__main__":
    main()
