"""The gather-only permutations of the dispatcher against plain index_select / index_add autograd."""
from __future__ import annotations

import torch

from moe.parallel.permute import combine_assignments, gather_assignments, inverse_permutation, permute_rows


def _routing(T: int, K: int, E: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx_TK = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    assign_S = torch.sort(idx_TK.flatten(), stable=True).indices  # expert-major, as plan_local orders them
    return assign_S, inverse_permutation(assign_S), torch.rand(T, K, generator=g)


def test_inverse_permutation():
    perm = torch.randperm(37)
    assert torch.equal(perm[inverse_permutation(perm)], torch.arange(37))


def test_permute_rows_matches_index_select_forward_and_backward():
    x = torch.randn(29, 7, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(29)
    g = torch.randn(29, 7, dtype=torch.float64)
    (permute_rows(x, perm, inverse_permutation(perm)) * g).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (x.index_select(0, perm) * g).sum().backward()
    assert torch.equal(ours, x.grad)
    assert torch.autograd.gradcheck(lambda t: permute_rows(t, perm, inverse_permutation(perm)), (x,))


def test_gather_and_combine_match_the_scatter_add_path():
    T, K, E, D = 23, 3, 5, 9
    assign_S, inv_S, gate_TK = _routing(T, K, E, seed=1)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    gate = gate_TK.double().requires_grad_(True)
    w = torch.randn(D, D, dtype=torch.float64)  # stands in for the experts: any row-wise function
    out = combine_assignments(gather_assignments(x, assign_S, inv_S, K) @ w, assign_S, inv_S, gate)
    out.pow(2).sum().backward()
    ours = (out.detach(), x.grad.clone(), gate.grad.clone())
    x.grad, gate.grad = None, None
    rows = assign_S // K
    y = x.index_select(0, rows) @ w
    ref = x.new_zeros(T, D).index_add(0, rows, y * gate.reshape(-1)[assign_S].unsqueeze(-1))
    ref.pow(2).sum().backward()
    for a, b in zip(ours, (ref.detach(), x.grad, gate.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
