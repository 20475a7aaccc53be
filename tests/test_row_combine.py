"""The combine's single-pass Triton row kernels against the torch path of moe.parallel.permute.

Without a GPU the kernels run in Triton's interpreter (fp32); with one, compiled, in fp32 and bf16.
Outputs are poisoned before each kernel run (torch.empty is refilled with NaN by a patched allocator)
so a row no program wrote shows; shapes are odd and include a token count of zero.
"""
from __future__ import annotations

import os

import pytest
import torch

_ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not _ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

pytest.importorskip("triton")

import moe.kernels.row_combine as rc  # noqa: E402
import moe.parallel.permute as permute  # noqa: E402

DEVICE = "cuda" if _ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if _ON_GPU else [torch.float32]
# (tokens, top-k, experts, hidden): hidden sizes cross the 64-wide interpreter block and end mid-block
SHAPES = [(0, 2, 3, 7), (1, 1, 2, 5), (13, 3, 5, 67), (29, 4, 7, 130)] + ([(777, 8, 64, 7168)] if _ON_GPU else [])


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(rc.torch, "empty", empty)
    monkeypatch.setattr(rc.torch, "empty_like", empty_like)


def _routing(T: int, K: int, E: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx_TK = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    assign_S = torch.sort(idx_TK.flatten(), stable=True).indices
    return (assign_S.to(DEVICE), permute.inverse_permutation(assign_S).to(DEVICE),
            torch.rand(T, K, generator=g).to(DEVICE))


def _run(mode: str, y, x, assign_S, inv_S, gate_TK, K, out_dtype):
    """Combine and dispatch-gather forward + backward through permute.py with its kernels on or off."""
    permute.ROW_KERNELS = mode
    try:
        y = y.detach().requires_grad_(True)
        x = x.detach().requires_grad_(True)
        gate = gate_TK.detach().requires_grad_(True)
        out = permute.combine_assignments(y, assign_S, inv_S, gate, out_dtype=out_dtype)
        sent = permute.gather_assignments(x, assign_S, inv_S, K)
        g_out = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
        g_sent = torch.linspace(1, -2, sent.numel(), device=DEVICE).view_as(sent).to(sent.dtype)
        (out.float() * g_out).sum().add((sent.float() * g_sent.float()).sum()).backward()
        return out.detach().float(), y.grad.float(), gate.grad.float(), x.grad.float()
    finally:
        permute.ROW_KERNELS = "auto"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_torch_path(shape, dtype):
    T, K, E, D = shape
    assign_S, inv_S, gate_TK = _routing(T, K, E, seed=T + D)
    g = torch.Generator().manual_seed(7)
    y = torch.randn(T * K, D, generator=g).to(DEVICE, dtype)
    x = torch.randn(T, D, generator=g).to(DEVICE, dtype)
    ours = _run("on", y, x, assign_S, inv_S, gate_TK, K, torch.float32)
    ref = _run("off", y.double(), x.double(), assign_S, inv_S, gate_TK.double(), K, torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # relative, in the Frobenius norm
    for name, a, b in zip(("out", "d_y", "d_gate", "d_x"), ours, ref):
        assert torch.isfinite(a).all(), f"{name}: unwritten (NaN) elements"
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_kernels_fail_on_a_wrong_position_table():
    """Negative control: the comparison above sees one swapped pair of positions."""
    T, K, E, D = 13, 3, 5, 67
    assign_S, inv_S, gate_TK = _routing(T, K, E, seed=3)
    y = torch.randn(T * K, D, device=DEVICE)
    pos_TK = inv_S.view(T, K).clone()
    ref = rc.gather_reduce(y, pos_TK, gate_TK, torch.float32)
    pos_TK[0, 0], pos_TK[5, 1] = pos_TK[5, 1].clone(), pos_TK[0, 0].clone()
    bad = rc.gather_reduce(y, pos_TK, gate_TK, torch.float32)
    assert (bad - ref).norm() / ref.norm() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dests,D", [(0, 4, 7), (1, 3, 5), (41, 17, 67), (200, 9, 130)])
def test_segment_sum_matches_index_add(rows, dests, D, dtype):
    """Any number of rows per destination, including none; asking for fewer rows than destinations."""
    g = torch.Generator().manual_seed(rows + D)
    dest_S = torch.randint(0, dests, (rows,), generator=g)
    dest_S[dest_S == 1] = 0  # destination 1 gets no rows
    y = torch.randn(rows, D, generator=g).to(DEVICE, dtype)
    perm_S, off_N1 = rc.token_segments(dest_S.to(DEVICE), dests)
    assert off_N1.tolist()[-1] == rows and off_N1.numel() == dests + 1
    for n in (dests, dests - 2):
        out = rc.segment_sum(y, perm_S, off_N1, n, torch.float32)
        ref = torch.zeros(dests, D, dtype=torch.float64).index_add(0, dest_S, y.double().cpu())[:n]
        assert torch.isfinite(out).all(), "unwritten (NaN) rows"
        assert torch.allclose(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
        assert n < 2 or torch.count_nonzero(out[1]) == 0


def test_segment_sum_refuses_too_few_segments():
    perm_S, off_N1 = rc.token_segments(torch.tensor([0, 2, 2], device=DEVICE), 3)
    with pytest.raises(ValueError, match="3 segments described, 4 rows asked for"):
        rc.segment_sum(torch.ones(3, 5, device=DEVICE), perm_S, off_N1, 4, torch.float32)
