"""All-to-all dispatch and combine on forced routings that break naive implementations.

Two gloo ranks, four experts (two per rank). Each case runs two forward/backward iterations and
compares this rank's outputs and its expert shard's gradients with all experts on one process."""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import spawn

E, D, F, T = 4, 5, 3, 6


def _routing(case: str, rank: int) -> torch.Tensor:
    """Expert ids [T, K] for `case` on `rank`."""
    t = torch.arange(T)
    if case == "idle_expert":  # expert 3 gets nothing from anyone
        return torch.stack([t % 3, (t + 1) % 3], -1)
    if case == "rank_sends_nothing_to_peer":  # rank 1 keeps all its tokens home
        return torch.stack([t % 4, (t + 1) % 4], -1) if rank == 0 else torch.stack([2 + t % 2, 2 + (t + 1) % 2], -1)
    if case == "rank_receives_nothing":  # everything goes to rank 0's experts
        return torch.stack([t % 2, (t + 1) % 2], -1)
    if case == "all_to_one_expert":
        return torch.zeros(T, 1, dtype=torch.long)
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


def _ep_case(rank: int, world: int, case: str, device: str):
    import torch.distributed as dist

    from moe.parallel.expert_parallel import AllToAllDispatcher

    full = _full_experts()
    El = E // world
    from moe.model.dispatch import GroupedExperts

    local = GroupedExperts(El, D, F).to(dev := torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu"))
    with torch.no_grad():
        for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
            getattr(local, name).copy_(getattr(full, name)[rank * El:(rank + 1) * El])
    disp = AllToAllDispatcher(dist.group.WORLD, world, rank, E, layer_id=0)
    outs, grads = [], []
    for step in range(2):
        idx = _routing(case, rank).to(dev)
        x, gate = (t.to(dev) for t in _inputs(rank, idx.shape[1], step))
        x.requires_grad_(True)
        out = disp.run(x, idx, gate, torch.ones_like(idx, dtype=torch.bool), local)
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
def test_edge_case_matches_one_process(case, device):
    world = 2
    results = spawn(_ep_case, world, case, device, backend="nccl" if device == "cuda" else "gloo")
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
