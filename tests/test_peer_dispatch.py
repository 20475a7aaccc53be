"""The P2P dispatcher's kernels and row layout, with the EP "ranks" simulated in one process.

On CPU the kernels run in Triton's interpreter, where a peer's buffer is just another tensor's address,
so the whole dispatch -> experts -> combine -> backward data path of moe.parallel.peer_dispatch is
checked against plain torch here; the symmetric-memory plumbing (rendezvous, barriers) runs on two GPUs
(tests/test_dispatch_edge_cases.py -k p2p, benchmarks/bench_a2a.py). Outputs are poisoned with NaN.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported
pytest.importorskip("triton")

from moe.kernels.peer_rows import pull_reduce, pull_rows, push_values  # noqa: E402
from moe.model.dispatch import plan_local  # noqa: E402
from moe.parallel.peer_dispatch import PeerBuffers, receive_layout, send_positions  # noqa: E402
from moe.parallel.permute import inverse_permutation  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ptrs(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=DEV)


def _nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=DEV)


def _routing(case: str, R: int, El: int, T: int, K: int, gen: torch.Generator) -> list[torch.Tensor]:
    E = R * El
    out = []
    for s in range(R):
        if case == "random":
            idx = torch.rand(T, E, generator=gen).topk(K, -1).indices
        elif case == "idle_expert_and_rank":  # the last rank's experts get nothing from anyone
            idx = torch.stack([(torch.arange(T) + j) % ((R - 1) * El) for j in range(K)], -1)
        elif case == "sends_nothing_to_peers":  # every rank keeps its tokens home
            idx = torch.stack([s * El + (torch.arange(T) + j) % El for j in range(K)], -1)
        else:  # all_to_one_expert, top-1
            idx = torch.zeros(T, K, dtype=torch.long)
        out.append(idx.to(DEV))
    return out


@pytest.mark.parametrize("case,K", [("random", 3), ("idle_expert_and_rank", 2), ("sends_nothing_to_peers", 2),
                                    ("all_to_one_expert", 1)])
@pytest.mark.parametrize("R,El,T,D", [(2, 2, 9, 67), (3, 2, 7, 130)])
def test_dispatch_combine_backward_match_torch(case, K, R, El, T, D):
    gen = torch.Generator().manual_seed(R * 100 + T)
    E = R * El
    xs = [torch.randn(T, D, generator=gen).to(DEV) for _ in range(R)]
    gates = [torch.rand(T, K, generator=gen).to(DEV) for _ in range(R)]
    douts = [torch.randn(T, D, generator=gen).to(DEV) for _ in range(R)]
    w_ED = torch.randn(E, D, generator=gen).to(DEV)  # "expert" e: y = x * w_ED[e]
    idxs = _routing(case, R, El, T, K, gen)
    plans = [plan_local(i, g, None, E) for i, g in zip(idxs, gates)]
    counts_RE = torch.stack([p.tokens_per_expert_E for p in plans])

    # Dispatch: senders publish x, the token of each slot and its gate; receivers pull rows and gates.
    X, IDX = [x.clone() for x in xs], [p.row_idx_S.to(torch.int32) for p in plans]
    GATE = [g.reshape(-1)[p.assign_S].contiguous() for g, p in zip(gates, plans)]
    recv, ys = [], []
    for p in range(R):
        n = int(counts_RE[:, p * El:(p + 1) * El].sum())
        src, slot, per_L = receive_layout(counts_RE, p, El, n)
        gate_N = _nan(n)
        x_recv = pull_rows(_ptrs(X), _ptrs(IDX), src, slot, _nan(n, D), gate_ptrs_R=_ptrs(GATE), gate_out_N=gate_N)
        picks = [(s, (idxs[s].reshape(-1)[plans[s].assign_S] == p * El + j).nonzero().flatten())
                 for j in range(El) for s in range(R)]
        expected = torch.cat([xs[s][plans[s].row_idx_S[k]] for s, k in picks] + [x_recv[:0]])
        assert torch.equal(x_recv, expected), f"receiver {p}: rows not in (local expert, source) order"
        assert torch.equal(gate_N, torch.cat([GATE[s][k] for s, k in picks] + [gate_N[:0]]))
        eid = torch.repeat_interleave(torch.arange(El, device=DEV) + p * El, per_L, output_size=n)
        recv.append((src, slot, x_recv, eid, gate_N))
        ys.append((gate_N[:, None] * x_recv * w_ED[eid]).contiguous())  # the experts apply the gates

    # Combine: senders pull their K rows per token and sum them.
    pos = []
    for s in range(R):
        rank_S, pos_S = send_positions(counts_RE, s, El, idxs[s].reshape(-1)[plans[s].assign_S])
        inv = inverse_permutation(plans[s].assign_S)
        rank_TK, pos_TK = rank_S[inv].view(T, K), pos_S[inv].view(T, K)
        pos.append((rank_TK, pos_TK))
        out = pull_reduce(_ptrs(ys), torch.float32, rank_TK, pos_TK, _nan(T, D))
        ref = (gates[s][..., None] * xs[s][:, None, :] * w_ED[idxs[s]]).sum(1)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    # Combine backward: receivers pull dout rows; the experts' backward gives the input and gate
    # gradients; the gate gradients are pushed into the senders' DGATE.
    DOUT = [d.clone() for d in douts]
    DGATE = [_nan(T * K) for _ in range(R)]
    gs = []
    for p in range(R):
        src, slot, x_recv, eid, gate_N = recv[p]
        dy = pull_rows(_ptrs(DOUT), _ptrs(IDX), src, slot, _nan(x_recv.shape[0], D))
        push_values(_ptrs(DGATE), src, slot, (dy * x_recv * w_ED[eid]).sum(-1))
        gs.append(gate_N[:, None] * dy * w_ED[eid])
    # Dispatch backward: senders pull and sum the gradients of their K received copies.
    for s in range(R):
        x = xs[s].clone().requires_grad_()
        g = gates[s].clone().requires_grad_()
        ref = (g[..., None] * x[:, None, :] * w_ED[idxs[s]]).sum(1)
        ref_dx, ref_dg = torch.autograd.grad(ref, [x, g], douts[s])
        dgate = torch.empty(T * K, device=DEV)
        dgate[plans[s].assign_S] = DGATE[s]
        torch.testing.assert_close(dgate.view(T, K), ref_dg, rtol=1e-5, atol=1e-5)
        dx = pull_reduce(_ptrs(gs), torch.float32, *pos[s], _nan(T, D))
        torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)


def test_wrong_layout_is_caught():
    """Negative control: the same comparison fails when the receiver reads its rows source-major."""
    gen = torch.Generator().manual_seed(0)
    R, El, T, K, D = 2, 2, 9, 2, 67
    xs = [torch.randn(T, D, generator=gen).to(DEV) for _ in range(R)]
    idxs = _routing("random", R, El, T, K, gen)
    plans = [plan_local(i, torch.rand(T, K, device=DEV), None, R * El) for i in idxs]
    counts_RE = torch.stack([p.tokens_per_expert_E for p in plans])
    n = int(counts_RE[:, :El].sum())
    src, slot, _ = receive_layout(counts_RE, 0, El, n)
    # Swap the roles of expert and source in the order: stable sort by source.
    order = torch.sort(src.long(), stable=True).indices
    idx = [p.row_idx_S.to(torch.int32) for p in plans]  # kept alive: the kernels see only addresses
    wrong = pull_rows(_ptrs(xs), _ptrs(idx), src[order], slot[order], _nan(n, D))
    right = pull_rows(_ptrs(xs), _ptrs(idx), src, slot, _nan(n, D))
    assert not torch.equal(wrong, right)


class _OneRankBuffers(PeerBuffers):
    """PeerBuffers for an EP group of one process on CPU: plain NaN-filled tensors instead of symmetric
    memory and a no-op barrier, so the autograd functions and the experts' in-place writes run here."""

    def ensure(self, t_rows: int, slots: int, r_rows: int) -> None:
        if t_rows <= self.caps[0] and slots <= self.caps[1] and r_rows <= self.caps[2]:
            return
        self.x = torch.full((t_rows, self.D), float("nan"), dtype=self.dtype, device=self.device)
        self.idx = torch.zeros(slots, dtype=torch.int32, device=self.device)
        self.gate, self.dgate = _nan(slots), _nan(slots)
        self.y = torch.full((r_rows, self.D), float("nan"), dtype=self.dtype, device=self.device)
        for name in ("x", "idx", "gate", "dgate", "y"):
            setattr(self, f"{name}_ptrs", _ptrs([getattr(self, name)]))
        self.caps = (t_rows, slots, r_rows)

    def barrier(self) -> None:
        pass


@pytest.mark.parametrize("backend,capacity,buffers", [
    ("triton", False, "plain"), ("torch", False, "plain"), ("triton", True, "plain"),
    *[pytest.param("triton", c, "symmetric", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="symmetric memory needs a GPU")) for c in (False, True)]])
def test_p2p_autograd_path_matches_local_dispatch(backend, capacity, buffers, monkeypatch):
    """The whole p2p layer (PeerDispatch -> experts with gates -> PeerCombine, and backward) with one
    rank against the local dispatcher: output, x, gate and expert-weight gradients, dropless and with a
    keep mask (dropped assignments add nothing and get zero gate gradient). The Triton experts must
    write their output and the input gradient straight into the Y buffer (no copy). `symmetric`: the
    real torch symmetric-memory buffers and barriers (NCCL, one GPU) instead of plain tensors."""
    import torch.distributed as dist

    import moe.kernels.grouped_swiglu as gs
    import moe.parallel.peer_dispatch as pd
    from moe.model.dispatch import GroupedExperts, LocalDispatcher
    from moe.parallel.expert_parallel import AllToAllDispatcher
    from tests.dist_utils import free_port

    monkeypatch.setattr(gs, "POISON_BUFFERS", True)
    published = []
    real_publish = pd._publish
    monkeypatch.setattr(pd, "_publish", lambda buf, rows: (published.append(rows.data_ptr() == buf.data_ptr()),
                                                           real_publish(buf, rows)))
    gen = torch.Generator().manual_seed(5)
    E, D, F, T, K = 5, 67, 24, 11, 2
    experts = GroupedExperts(E, D, F, backend=backend)
    for w in experts.parameters():
        w.data.copy_(torch.randn(w.shape, generator=gen) * 0.2)
    experts = experts.to(DEV)
    ref_experts = GroupedExperts(E, D, F, backend="torch").to(DEV)
    ref_experts.load_state_dict(experts.state_dict())
    x = torch.randn(T, D, generator=gen).to(DEV)
    gate = torch.rand(T, K, generator=gen).to(DEV)
    idx = (torch.rand(T, E - 1, generator=gen).topk(K, -1).indices).to(DEV)  # expert E-1 idle
    dout = torch.randn(T, D, generator=gen).to(DEV)
    keep = (torch.rand(T, K, generator=gen) > 0.3).to(DEV) if capacity else None

    real = buffers == "symmetric"
    if real:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if real else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        disp = AllToAllDispatcher(dist.group.WORLD, 1, 0, E, layer_id=0, comm="p2p")
        if not real:
            disp.peer_buffers[(torch.float32, D)] = _OneRankBuffers(None, torch.float32, D, torch.device(DEV))
        results = []
        for d, ex in ((disp, experts), (LocalDispatcher(), ref_experts)):
            xg, gg = x.clone().requires_grad_(), gate.clone().requires_grad_()
            out = d.run(xg, idx, gg, keep, ex)
            grads = torch.autograd.grad(out, [xg, gg, *ex.parameters()], dout)
            results.append((out.detach(), *grads))
    finally:
        dist.destroy_process_group()
    for name, a, b in zip(["out", "dx", "dgate", "dw_gate", "dw_up", "dw_down"], *results):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert results[0][5][E - 1].abs().sum() == 0  # the idle expert: zero gradient, not NaN
    if capacity:
        assert (~keep).any() and (results[0][2][~keep] == 0).all()
    # Two publishes of Y: the expert output (forward) and the expert-input gradient (backward).
    assert published == ([True, True] if backend == "triton" else [False, False])


def test_p2p_refused_without_nccl_before_any_step():
    """apply_expert_parallel(comm='p2p') on a gloo group is an error naming the backend, raised before
    the model is touched (the config check catches CPU runs earlier; this guards direct callers)."""
    import torch.distributed as dist

    from moe.parallel.expert_parallel import apply_expert_parallel
    from tests.dist_utils import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"comm='p2p' needs an NCCL EP group.*backend gloo.*Use comm='nccl'"):
            apply_expert_parallel(None, dist.group.WORLD, 1, 0, [0], [0], comm="p2p")
    finally:
        dist.destroy_process_group()


def test_p2p_barrier_carries_the_configured_timeout():
    """A peer that never arrives must end the barrier after parallel.timeout_s, not hang it forever."""
    calls = []

    class Handle:
        def barrier(self, channel: int = 0, timeout_ms: int = 0) -> None:
            calls.append((channel, timeout_ms))

    bufs = PeerBuffers(None, torch.float32, 8, torch.device("cpu"), timeout_s=7)
    bufs.handle = Handle()
    bufs.barrier()
    assert calls == [(0, 7000)]
