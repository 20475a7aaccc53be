"""Model shapes, parameter counts, determinism, and the expert-compute backends."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moe.model.experts import routed_experts
from moe.model.params import count_params_from_config
from moe.model.transformer import build_model, count_params
from tests.conftest import job_from


@pytest.mark.parametrize("preset", ["deepseek_tiny", "mixtral_small"])
def test_output_shape_and_finite(preset):
    cfg = job_from([f"model={preset}"]).model
    if preset == "mixtral_small":  # shrink the width, keep the structure (GQA, softmax, no shared expert)
        cfg = dataclasses.replace(cfg, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2,
                                  vocab_size=256, moe=dataclasses.replace(cfg.moe, expert_intermediate_size=32))
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    logits = model(tokens)
    assert logits.shape == (2, 17, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(model.aux_loss())


def test_deepseek_small_param_counts():
    cfg = job_from(["model=deepseek_small"]).model
    counts = count_params_from_config(cfg)
    assert round(counts.total / 1e6) == 467
    assert round(counts.active / 1e6) == 159
    with torch.device("meta"):
        from moe.model.transformer import Transformer

        model = Transformer(cfg)
    total, active = count_params(model, cfg)
    assert total == counts.total and active == counts.active


def test_deepseek_v3_param_counts_from_config():
    counts = count_params_from_config(job_from(["model=deepseek_v3"]).model)
    assert 670e9 < counts.total < 672e9  # 671B without the multi-token-prediction module
    assert 37e9 < counts.active < 38e9


def test_causal():
    cfg = job_from(["model=deepseek_tiny"]).model
    model = build_model(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    a, b = model(tokens), model(changed)
    # Earlier positions must not see later tokens (up to BLAS blocking: experts' row counts change).
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-5)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-2


def test_same_seed_same_weights_different_seed_differs():
    cfg = job_from(["model=deepseek_tiny"]).model
    a, b, c = build_model(cfg, 5), build_model(cfg, 5), build_model(cfg, 6)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.output.weight, c.output.weight)


def _expert_inputs(E=5, D=7, F=3, counts=(3, 0, 1, 5, 0), T=6, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_gate = torch.randn(E, D, F, generator=g)
    w_up = torch.randn(E, D, F, generator=g)
    w_down = torch.randn(E, F, D, generator=g)
    tpe = torch.tensor(counts)
    S = int(tpe.sum())
    x = torch.randn(T, D, generator=g)
    row_idx = torch.randint(0, T, (S,), generator=g)
    gate = torch.rand(S, generator=g)
    return x, w_gate, w_up, w_down, tpe, row_idx, gate


def test_torch_experts_against_per_row_formula():
    x, wg, wu, wd, tpe, row_idx, gate = _expert_inputs()
    out = routed_experts(x, wg, wu, wd, tpe, row_idx, gate, x.shape[0], backend="torch")
    expect = torch.zeros_like(x)
    experts = torch.repeat_interleave(torch.arange(len(tpe)), tpe)
    for s in range(len(row_idx)):
        e, r = experts[s], row_idx[s]
        h = torch.nn.functional.silu(x[r] @ wg[e]) * (x[r] @ wu[e])
        expect[r] += gate[s] * (h @ wd[e])
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_idle_experts_get_exact_zero_grad():
    x, wg, wu, wd, tpe, row_idx, gate = _expert_inputs()
    for w in (wg, wu, wd):
        w.requires_grad_(True)
    routed_experts(x, wg, wu, wd, tpe, row_idx, gate, x.shape[0], backend="torch").sum().backward()
    for w in (wg, wu, wd):
        assert w.grad is not None
        assert torch.count_nonzero(w.grad[1]) == 0 and torch.count_nonzero(w.grad[4]) == 0
        assert torch.count_nonzero(w.grad[3]) > 0


@pytest.mark.parametrize("qd, vd", [(96, 64), (24, 40)])
def test_attention_one_head_size_matches_sdpa(qd, vd):
    """The padded attention that deterministic runs use for MLA's unequal head sizes (so flash attention
    can take them) gives SDPA's output and gradients."""
    from moe.model.attention import attention_one_head_size

    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 17, qd, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, 17, vd, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, 17, vd, generator=gen, dtype=torch.float64)
    results = []
    for fn in (attention_one_head_size, lambda *a: torch.nn.functional.scaled_dot_product_attention(*a, is_causal=True)):
        out = fn(q, k, v)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dy)))
    for a, b in zip(*results):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rotary_tables_are_built_once_and_match_the_formula():
    """The attention's cached cos/sin tables equal `rope_cos_sin` for every length up to the model's, are
    computed on the fly beyond it, and stay out of the state dict (checkpoints)."""
    from moe.model.layers import RotaryTables, rope_cos_sin

    tables = RotaryTables(max_seq_len=64, dim=32, theta=10000.0)
    for S in (1, 17, 64, 80):
        cos, sin = tables(S)
        ref_cos, ref_sin = rope_cos_sin(S, 32, 10000.0, torch.device("cpu"))
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert tables(17)[0].data_ptr() == tables.cos_SR.data_ptr()  # a view of the table, not a new one
    assert tables.state_dict() == {}
