"""All-to-all dispatch and combine on forced routings that break naive implementations.

Two gloo ranks, four experts (two per rank). Each case runs two forward/backward iterations and
compares this rank's outputs and its expert shard's gradients with all experts on one process."""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import spawn

E, D, F, T = 4, 5, 3, 6


def _routing(case: str, rank: int, T_: int = T, E_: int = E, K: int = 2) -> torch.Tensor:
    """Expert ids [T, K] for `case` on `rank` of two, with E_ experts (the first half on rank 0)."""
    t, half = torch.arange(T_), E_ // 2
    if case == "idle_expert":  # the last expert gets nothing from anyone
        return torch.stack([(t + j) % (E_ - 1) for j in range(K)], -1)
    if case == "rank_sends_nothing_to_peer":  # rank 1 keeps all its tokens home
        return torch.stack([(t + j) % E_ if rank == 0 else half + (t + j) % half for j in range(K)], -1)
    if case == "rank_receives_nothing":  # everything goes to rank 0's experts
        return torch.stack([(t + j) % half for j in range(K)], -1)
    if case == "all_to_one_expert":
        return torch.zeros(T_, K, dtype=torch.long)
    raise KeyError(case)


def _inputs(rank: int, K: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)


def _full_experts():
    from moe.model.dispatch import GroupedExperts

    torch.manual_seed(0)
    ex = GroupedExperts(E, D, F)
    for p in ex.parameters():
        torch.nn.init.normal_(p)
    return ex


def _ep_case(rank: int, world: int, case: str, device: str, dropless: bool, regroup: str = "copy", comm: str = "nccl"):
    """`regroup="index"`: experts that read rows by index (as the Triton backend does), so the dispatcher
    hands them the regroup permutation instead of copying; on CPU the torch backend's gather mode.
    `comm="p2p"`: the symmetric-memory transport (GPU only), with the Triton experts."""
    import torch.distributed as dist

    from moe.parallel.expert_parallel import AllToAllDispatcher

    full = _full_experts()
    El = E // world
    from moe.model.dispatch import GroupedExperts

    class IndexExperts(GroupedExperts):
        gathers_rows = True

    cls = IndexExperts if regroup == "index" else GroupedExperts
    triton_experts = (regroup == "index" or comm == "p2p") and device == "cuda"
    local = cls(El, D, F, backend="triton" if triton_experts else "torch").to(dev := torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu"))
    with torch.no_grad():
        for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
            getattr(local, name).copy_(getattr(full, name)[rank * El:(rank + 1) * El])
    disp = AllToAllDispatcher(dist.group.WORLD, world, rank, E, layer_id=0, comm=comm)
    outs, grads = [], []
    for step in range(2):
        idx = _routing(case, rank).to(dev)
        x, gate = (t.to(dev) for t in _inputs(rank, idx.shape[1], step))
        x.requires_grad_(True)
        keep = None if dropless else torch.ones_like(idx, dtype=torch.bool)  # None: the dropless path
        out = disp.run(x, idx, gate, keep, local)
        out.pow(2).sum().backward()
        outs.append(out.detach().cpu())
        grads.append({n: p.grad.cpu() if p.grad is not None else None for n, p in local.named_parameters()})
        local.zero_grad(set_to_none=True)
    return outs, grads


def _reference(case: str, world: int):
    from moe.model.dispatch import LocalDispatcher

    full = _full_experts()
    outs, grads = [], []
    for step in range(2):
        per_rank = []
        loss = 0
        for r in range(world):
            idx = _routing(case, r)
            x, gate = _inputs(r, idx.shape[1], step)
            out = LocalDispatcher().run(x, idx, gate, torch.ones_like(idx, dtype=torch.bool), full)
            per_rank.append(out.detach())
            loss = loss + out.pow(2).sum()
        loss.backward()
        outs.append(per_rank)
        grads.append({n: p.grad.clone() for n, p in full.named_parameters()})
        full.zero_grad(set_to_none=True)
    return outs, grads


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs"))])
@pytest.mark.parametrize("case", ["idle_expert", "rank_sends_nothing_to_peer", "rank_receives_nothing",
                                  "all_to_one_expert"])
@pytest.mark.parametrize("dropless,regroup,comm", [(True, "copy", "nccl"), (False, "copy", "nccl"),
                                                   (True, "index", "nccl"), (True, "copy", "p2p"),
                                                   (False, "copy", "p2p")])
def test_edge_case_matches_one_process(case, device, dropless, regroup, comm):
    if comm == "p2p" and device != "cuda":
        pytest.skip("the P2P transport needs GPUs (its kernels are tested on CPU in test_peer_dispatch.py)")
    world = 2
    results = spawn(_ep_case, world, case, device, dropless, regroup, comm,
                    backend="nccl" if device == "cuda" else "gloo")
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=1e-4, atol=1e-5)
    ref_outs, ref_grads = _reference(case, world)
    El = E // world
    for rank, (outs, grads) in enumerate(results):
        for step in range(2):
            assert torch.isfinite(outs[step]).all()
            torch.testing.assert_close(outs[step], ref_outs[step][rank], **tol)
            for name, g in grads[step].items():
                assert g is not None, f"{case}: rank {rank} {name} has no gradient"
                ref = ref_grads[step][name][rank * El:(rank + 1) * El]
                torch.testing.assert_close(g, ref, **tol)
                for le in range(El):
                    if torch.count_nonzero(ref[le]) == 0:  # idle expert: exactly zero, not NaN
                        assert torch.count_nonzero(g[le]) == 0 and torch.isfinite(g[le]).all()
    if case == "idle_expert":
        assert torch.count_nonzero(ref_grads[0]["w_gate_EDF"][3]) == 0


# --- The same four cases inside real training steps (deepseek_tiny, ep=2, the whole loop) ---------------

TINY_E, TINY_K = 8, 2  # deepseek_tiny's experts and top-k


def _force_case_and_record_grads(case: str, out_dir: str) -> None:
    """In each spawned rank: force the routing of every MoE layer, and after each step's gradient
    reduction record, per local expert, whether its gradients are exactly zero and finite."""
    import dataclasses
    import json
    import os

    import torch.distributed as dist

    import moe.model.router as router_mod
    import moe.train.loop as loop_mod

    original_forward, original_reduce = router_mod.Router.forward, loop_mod.reduce_gradients

    def forced(self, x_TD, seq_len):
        out = original_forward(self, x_TD, seq_len)
        idx = _routing(case, dist.get_rank(), x_TD.shape[0], TINY_E, TINY_K).to(x_TD.device)
        return dataclasses.replace(out, expert_idx_TK=idx, keep_TK=torch.ones_like(idx, dtype=torch.bool),
                                   tokens_per_expert_E=torch.zeros(TINY_E, dtype=torch.long, device=idx.device)
                                   .scatter_add_(0, idx.flatten(), torch.ones_like(idx.flatten())))

    def recording(model, ctx):
        original_reduce(model, ctx)
        rows = []
        for layer, moe in model.moe_layers().items():
            for name, p in moe.experts.named_parameters():
                for le in range(p.shape[0]):
                    g = p.grad[le]
                    rows.append({"layer": layer, "param": name, "expert": ctx.ep_rank * p.shape[0] + le,
                                 "zero": bool(torch.count_nonzero(g) == 0), "finite": bool(torch.isfinite(g).all())})
        with open(os.path.join(out_dir, f"grads_rank{ctx.rank}.jsonl"), "a") as f:
            f.write(json.dumps(rows) + "\n")

    router_mod.Router.forward = forced
    loop_mod.reduce_gradients = recording


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs"))])
@pytest.mark.parametrize("case", ["idle_expert", "rank_sends_nothing_to_peer", "rank_receives_nothing",
                                  "all_to_one_expert"])
@pytest.mark.parametrize("comm", ["nccl", "p2p"])
def test_edge_case_trains_two_steps(tmp_path, case, device, comm):
    """Two whole training steps with ep=2: finite losses, every expert gradient present and finite, and
    exactly zero for the experts no rank routed to (Adam's update must not see NaN). `p2p`: the
    symmetric-memory transport chosen by config (GPU only), through the same worker entry point."""
    if comm == "p2p" and device != "cuda":
        pytest.skip("the P2P transport needs GPUs")
    import functools
    import json
    import math

    from tests.conftest import job_from
    from tests.dist_utils import run_distributed

    job = job_from(["model=deepseek_tiny", "data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false",
                    "train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_len=16",
                    "train.eval_every=0", "parallel.dp=2", "parallel.ep=2", "cluster.num_workers=2",
                    f"cluster.use_gpu={device == 'cuda'}", f"parallel.ep_comm={comm}"])
    job.run_dir = str(tmp_path)
    summaries = run_distributed(job, world=2, patch=functools.partial(_force_case_and_record_grads, case, str(tmp_path)))
    assert all(math.isfinite(x) for s in summaries for x in s["losses"] + s["grad_norms"])
    T_ = 2 * 16  # tokens per micro-batch on one rank
    used = {int(e) for r in range(2) for e in _routing(case, r, T_, TINY_E, TINY_K).flatten()}
    for rank in range(2):
        steps = [json.loads(line) for line in open(tmp_path / f"grads_rank{rank}.jsonl")]
        assert len(steps) == 2
        for rows in steps:
            assert rows and all(r["finite"] for r in rows)
            for r in rows:
                if r["expert"] not in used:
                    assert r["zero"], r
                else:
                    assert not r["zero"], r  # a used expert learns (guards against an all-zero bug)
