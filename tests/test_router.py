"""Router tests against hand-computed values.

Most tests build a router whose weight is the identity (D == E), so the input rows ARE the logits;
sigmoid scores are set exactly through their logit log(s / (1 - s)), softmax probabilities through
log(p) (+ any per-token constant, which softmax ignores).
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import moe.model.router as router_mod
from moe.config import RouterConfig
from moe.model.balancing import (
    expert_bias_delta,
    normalise_scores,
    sequence_balancing_loss,
    switch_balancing_loss,
    update_expert_bias,
    z_loss,
)
from moe.model.router import Router, capacity_keep_mask, expert_capacity


def logit(s: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(s, dtype=torch.float64)
    return torch.log(t / (1 - t)).float()


def make_router(E: int, K: int, **kw) -> Router:
    cfg = RouterConfig(**{"use_expert_bias": False, **kw})
    r = Router(E, E, K, cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    return r


def close(a, b, tol=1e-5) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


# ---------------------------------------------------------------- selection and gates

def test_bias_changes_choice_not_gate():
    x = logit([[0.9, 0.8, 0.3, 0.1]])
    r = make_router(4, 2, use_expert_bias=True, route_scale=2.0)
    out = r(x, 1)
    assert out.expert_idx_TK.tolist() == [[0, 1]]
    close(out.gate_TK, [[2.0 * 0.9 / 1.7, 2.0 * 0.8 / 1.7]])

    # biased selection scores: [0.9, 0.8, 0.85, 0.1] -> experts 0 then 2
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.55, 0.0]))
    out = r(x, 1)
    assert out.expert_idx_TK.tolist() == [[0, 2]]
    # gates from the UNbiased 0.9 and 0.3: 0.75 and 0.25, times route_scale 2
    close(out.gate_TK, [[1.5, 0.5]])
    assert out.gate_TK.dtype == torch.float32 and out.expert_idx_TK.dtype == torch.int64
    assert out.keep_TK.all()
    assert out.tokens_per_expert_E.tolist() == [1, 0, 1, 0]

    # use_expert_bias=False ignores the buffer
    r.cfg = replace(r.cfg, use_expert_bias=False)
    assert r(x, 1).expert_idx_TK.tolist() == [[0, 1]]


def test_sigmoid_unnormalised_gate_is_raw_score():
    x = logit([[0.9, 0.8, 0.3, 0.1]])
    r = make_router(4, 2, use_expert_bias=True, norm_topk_prob=False, route_scale=2.5)
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.55, 0.0]))
    close(r(x, 1).gate_TK, [[2.5 * 0.9, 2.5 * 0.3]])


def test_softmax_vs_sigmoid_gates():
    x = torch.log(torch.tensor([[4.0, 2.0, 1.0, 1.0]]))
    # softmax probs [0.5, 0.25, 0.125, 0.125]
    close(make_router(4, 2, score_func="softmax", norm_topk_prob=False)(x, 1).gate_TK, [[0.5, 0.25]])
    close(make_router(4, 2, score_func="softmax", norm_topk_prob=True)(x, 1).gate_TK, [[2 / 3, 1 / 3]])
    # sigmoid(ln 4) = 4/5, sigmoid(ln 2) = 2/3 -> normalised 6/11, 5/11
    close(make_router(4, 2, score_func="sigmoid", norm_topk_prob=True)(x, 1).gate_TK, [[6 / 11, 5 / 11]])
    close(make_router(4, 2, score_func="sigmoid", norm_topk_prob=False)(x, 1).gate_TK, [[0.8, 2 / 3]])


# ---------------------------------------------------------------- group-limited routing

def test_group_limited_hand_example():
    # groups {0,1} {2,3} {4,5}; top-2 sums: 1.0, 1.5, 1.1
    x = logit([[0.9, 0.1, 0.8, 0.7, 0.6, 0.5]])
    assert sorted(make_router(6, 2)(x, 1).expert_idx_TK[0].tolist()) == [0, 2]  # ungrouped
    out = make_router(6, 2, n_group=3, topk_group=1)(x, 1)
    assert out.expert_idx_TK.tolist() == [[2, 3]]  # best group only, though expert 0 scores highest
    close(out.gate_TK, [[0.8 / 1.5, 0.7 / 1.5]])
    out = make_router(6, 3, n_group=3, topk_group=2)(x, 1)
    assert out.expert_idx_TK.tolist() == [[2, 3, 4]]  # groups 1 and 2; group 0 (sum 1.0) is out

    # bias moves the group choice: group 2's biased sum is 2.1; gates still from unbiased 0.6, 0.5
    r = make_router(6, 2, n_group=3, topk_group=1, use_expert_bias=True)
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5]))
    out = r(x, 1)
    assert out.expert_idx_TK.tolist() == [[4, 5]]
    close(out.gate_TK, [[6 / 11, 5 / 11]])


def test_group_of_one_expert_uses_its_max():
    x = logit([[0.2, 0.9, 0.4, 0.7]])
    out = make_router(4, 2, n_group=4, topk_group=2)(x, 1)
    assert out.expert_idx_TK.tolist() == [[1, 3]]


def test_group_limited_random_tokens_stay_in_topk_group_groups():
    g = torch.Generator().manual_seed(0)
    T, D, E, K, G, J = 3000, 16, 32, 6, 8, 3
    r = Router(D, E, K, RouterConfig(n_group=G, topk_group=J, use_expert_bias=True))
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=g))
        r.expert_bias.copy_(torch.randn(E, generator=g) * 0.3)
    x = torch.randn(T, D, generator=g)
    idx = r(x, 1).expert_idx_TK
    groups_TK = idx // (E // G)
    n_groups_T = torch.tensor([len(set(row)) for row in groups_TK.tolist()])
    assert n_groups_T.max().item() <= J
    assert n_groups_T.min().item() >= 2  # the constraint binds but does not collapse to one group
    assert all(len(set(row)) == K for row in idx.tolist())  # distinct experts
    # the K chosen are the best biased experts inside the chosen groups (brute force on a few tokens)
    choice = torch.sigmoid(x @ r.weight.T) + r.expert_bias
    for t in range(50):
        per_group = choice[t].view(G, E // G)
        top2 = per_group.topk(2, dim=-1).values.sum(-1)
        kept = set(top2.topk(J).indices.tolist())
        allowed = [e for e in range(E) if e // (E // G) in kept]
        best = sorted(allowed, key=lambda e: -choice[t, e].item())[:K]
        assert sorted(best) == sorted(idx[t].tolist())


# ---------------------------------------------------------------- capacity

def test_capacity_both_policies():
    # E=3, K=2, T=3, capacity = ceil(1.0 * 3 * 2 / 3) = 2; raw gates (norm off)
    x = logit([[0.9, 0.8, 0.1],    # -> e0 (0.9), e1 (0.8)
               [0.7, 0.2, 0.6],    # -> e0 (0.7), e2 (0.6)
               [0.95, 0.85, 0.3]])  # -> e0 (0.95), e1 (0.85)
    # expert 0 gets 3 assignments for 2 slots
    r = make_router(3, 2, capacity_factor=1.0, norm_topk_prob=False, drop_policy="position")
    out = r(x, 3)
    assert out.expert_idx_TK.tolist() == [[0, 1], [0, 2], [0, 1]]
    assert out.keep_TK.tolist() == [[True, True], [True, True], [False, True]]  # latest token dropped
    close(out.gate_TK, [[0.9, 0.8], [0.7, 0.6], [0.0, 0.85]])
    assert out.tokens_per_expert_E.tolist() == [2, 2, 1]
    assert out.metrics["dropped"].item() == 1

    r = make_router(3, 2, capacity_factor=1.0, norm_topk_prob=False, drop_policy="probs")
    out = r(x, 3)
    assert out.keep_TK.tolist() == [[True, True], [False, True], [True, True]]  # lowest gate (0.7) dropped
    close(out.gate_TK, [[0.9, 0.8], [0.0, 0.6], [0.95, 0.85]])
    assert out.tokens_per_expert_E.tolist() == [2, 2, 1]
    assert out.metrics["dropped"].item() == 1

    # balancing losses count assignments before drops: same value as dropless
    lb = lambda **kw: make_router(3, 2, norm_topk_prob=False, **kw)(x, 3).metrics["load_balancing_loss"]
    close(lb(capacity_factor=1.0), lb(capacity_factor=0.0))


def test_capacity_ties_keep_token_order():
    # K=1 with normalisation: every gate is exactly 1, so `probs` falls back to token order
    x = logit([[0.6, 0.1], [0.7, 0.2], [0.9, 0.3], [0.2, 0.8], [0.8, 0.1]])
    r = make_router(2, 1, capacity_factor=1.0, drop_policy="probs")  # capacity ceil(5/2) = 3
    out = r(x, 5)
    assert out.keep_TK.squeeze(1).tolist() == [True, True, True, True, False]
    # the mask helper directly: priorities [0.5, 0.9, 0.5, 0.9] on one expert, capacity 3
    keep = capacity_keep_mask(torch.zeros(4, 1, dtype=torch.long), torch.tensor([[0.5], [0.9], [0.5], [0.9]]), 1, 3)
    assert keep.squeeze(1).tolist() == [True, True, False, True]
    keep = capacity_keep_mask(torch.zeros(4, 1, dtype=torch.long), None, 1, 3)
    assert keep.squeeze(1).tolist() == [True, True, True, False]


def test_expert_capacity_formula():
    assert expert_capacity(1.0, 5, 2, 4) == 3      # ceil(2.5)
    assert expert_capacity(1.1, 20, 1, 2) == 11    # 1.1*20/2 is 11.000000000000002 in floats
    assert expert_capacity(1.25, 16, 2, 8) == 5
    assert expert_capacity(0.01, 10, 1, 8) == 1


def test_dropless_keeps_everything():
    out = make_router(4, 2)(logit([[0.9, 0.8, 0.3, 0.1], [0.1, 0.2, 0.3, 0.4]]), 2)
    assert out.keep_TK.all() and out.metrics["dropped"].item() == 0
    assert out.tokens_per_expert_E.tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------- balancing losses

# softmax probabilities of four tokens over E=3 experts, and per-token logit offsets (lse = offset)
P4 = [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]
OFFS = [1.0, 2.0, 0.0, -1.0]


def softmax_logits() -> torch.Tensor:
    return torch.log(torch.tensor(P4, dtype=torch.float64)).float() + torch.tensor(OFFS).unsqueeze(1)


def test_losses_softmax_hand_values():
    # K=1: experts [0, 0, 1, 2]; counts [2, 1, 1]; f = [.5, .25, .25]; P = [.35, .325, .325]
    aux = 3 * (0.5 * 0.35 + 0.25 * 0.325 + 0.25 * 0.325)  # 1.0125
    # sequences of 2: seq0 f=[1,0,0], P0=.55 -> 1.65; seq1 f=[0,.5,.5], P=[.,.45,.4] -> 1.275
    seq = (3 * 0.55 + 3 * (0.5 * 0.45 + 0.5 * 0.4)) / 2  # 1.4625
    z = (1.0 + 4.0 + 0.0 + 1.0) / 4  # logsumexp = the offsets
    r = make_router(3, 1, score_func="softmax", aux_loss_coeff=0.1, seq_aux_loss_coeff=0.2,
                    global_aux_loss_coeff=0.3, z_loss_coeff=0.01)
    out = r(softmax_logits(), 2)
    assert out.expert_idx_TK.squeeze(1).tolist() == [0, 0, 1, 2]
    close(out.metrics["load_balancing_loss"], 1.0125)
    close(out.metrics["seq_load_balancing_loss"], 1.4625)
    close(out.metrics["global_load_balancing_loss"], 1.0125)  # no group: local counts
    close(out.metrics["z_loss"], 1.5)
    close(out.aux_loss, 0.1 * aux + 0.2 * seq + 0.3 * aux + 0.01 * z)
    assert set(out.metrics) == {"load_balancing_loss", "seq_load_balancing_loss",
                                "global_load_balancing_loss", "z_loss", "dropped"}
    assert all(not v.requires_grad for v in out.metrics.values())


def test_pure_loss_functions_hand_values():
    probs = torch.tensor(P4)
    idx = torch.tensor([[0], [0], [1], [2]])
    close(switch_balancing_loss(probs, torch.tensor([2, 1, 1])), 1.0125)
    close(sequence_balancing_loss(probs, idx, 2), 1.4625)
    close(sequence_balancing_loss(probs, idx, 4), 1.0125)  # one sequence == micro-batch loss
    close(z_loss(softmax_logits()), 1.5)
    # uniform routing gives exactly 1
    close(switch_balancing_loss(torch.full((4, 4), 0.25), torch.tensor([2, 2, 2, 2])), 1.0)
    with pytest.raises(ValueError, match="seq_len=3"):
        sequence_balancing_loss(probs, idx, 3)


def test_losses_sigmoid_normalise_scores_per_token():
    # scores [.6,.2] -> [.75,.25]; [.4,.6] -> same; [.8,.2] -> same. Experts 0, 1, 0
    # f = [2/3, 1/3]; P = [1.95/3, 1.05/3] = [.65, .35]; aux = 2 * (2/3*.65 + 1/3*.35) = 1.1
    x = logit([[0.6, 0.2], [0.4, 0.6], [0.8, 0.2]])
    close(normalise_scores(torch.sigmoid(x), "sigmoid"), [[0.75, 0.25], [0.4, 0.6], [0.8, 0.2]])
    r = make_router(2, 1, aux_loss_coeff=1.0, seq_aux_loss_coeff=1.0)
    close(r(x, 3).metrics["load_balancing_loss"], 1.1)
    close(r(x, 3).metrics["seq_load_balancing_loss"], 1.1)
    # per-token sequences: 2*.75, 2*.6, 2*.8 -> mean 4.3/3
    close(r(x, 1).metrics["seq_load_balancing_loss"], 4.3 / 3)
    close(r(x, 3).aux_loss, 2.2)


def test_global_aux_loss_uses_summed_counts(monkeypatch):
    # pretend another rank routed 2, 0, 6 tokens: global counts [4, 1, 7], f = [4, 1, 7] / 12; P local
    def fake_all_reduce(t, op=None, group=None):
        t.add_(torch.tensor([2, 0, 6]))

    monkeypatch.setattr(router_mod.dist, "all_reduce", fake_all_reduce)
    r = make_router(3, 1, score_func="softmax", global_aux_loss_coeff=0.5)
    r.global_group = object()  # any non-None group: the (faked) collective runs
    out = r(softmax_logits(), 2)
    glob = 3 * (4 / 12 * 0.35 + 1 / 12 * 0.325 + 7 / 12 * 0.325)
    close(out.metrics["global_load_balancing_loss"], glob)
    close(out.metrics["load_balancing_loss"], 1.0125)  # the local one is untouched
    close(out.aux_loss, 0.5 * glob)
    assert out.tokens_per_expert_E.tolist() == [2, 1, 1]  # local counts reported


def _global_aux_on_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    r = make_router(3, 1, score_func="softmax", global_aux_loss_coeff=1.0)
    r.global_group = dist.group.WORLD
    x = softmax_logits() if rank == 0 else torch.log(torch.tensor([[0.1, 0.2, 0.7]] * 4))
    out = r(x, 4)
    return {k: v.item() for k, v in out.metrics.items()} | {"counts": out.tokens_per_expert_E.tolist()}


def test_global_aux_loss_real_gloo_group():
    from tests.dist_utils import spawn

    res = spawn(_global_aux_on_rank, 2, timeout_s=60)
    assert res[0]["counts"] == [2, 1, 1] and res[1]["counts"] == [0, 0, 4]
    # global counts [2, 1, 5] / 8; each rank keeps its own P: [.35, .325, .325] and [.1, .2, .7]
    close(res[0]["global_load_balancing_loss"], 3 * (2 / 8 * 0.35 + 1 / 8 * 0.325 + 5 / 8 * 0.325))  # 0.99375
    close(res[1]["global_load_balancing_loss"], 3 * (2 / 8 * 0.1 + 1 / 8 * 0.2 + 5 / 8 * 0.7))  # 1.4625
    close(res[1]["load_balancing_loss"], 3 * 0.7)  # local: all four tokens on expert 2


def test_no_losses_enabled_gives_zero():
    out = make_router(3, 1, score_func="softmax")(softmax_logits(), 2)
    assert out.aux_loss.item() == 0.0 and out.aux_loss.dim() == 0
    close(out.metrics["load_balancing_loss"], 1.0125)  # metrics still computed


# ---------------------------------------------------------------- gradient

@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_aux_loss_gradient(score_func):
    torch.manual_seed(0)
    cfg = RouterConfig(score_func=score_func, aux_loss_coeff=1e-2, seq_aux_loss_coeff=1e-3,
                       global_aux_loss_coeff=1e-2, z_loss_coeff=1e-3, use_expert_bias=True)
    r = Router(8, 6, 2, cfg, init_std=1.0)  # wide score gaps: a small step flips no top-k choice
    x = torch.randn(12, 8)
    out = r(x, 4)
    out.aux_loss.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    assert r.expert_bias.grad is None

    # central finite differences along a random direction; the router computes in fp32, so the
    # step is 1e-3 (large enough to beat fp32 rounding)
    w0 = r.weight.detach().clone()
    d = torch.randn_like(w0)
    eps = 1e-3

    def loss_at(w):
        with torch.no_grad():
            r.weight.copy_(w)
            o = r(x, 4)
            assert torch.equal(o.expert_idx_TK, out.expert_idx_TK)  # same choices: loss is smooth here
            return o.aux_loss.item()

    numeric = (loss_at(w0 + eps * d) - loss_at(w0 - eps * d)) / (2 * eps)
    analytic = (r.weight.grad * d).sum().item()
    assert math.isclose(numeric, analytic, rel_tol=1e-2, abs_tol=1e-7)


def test_gate_gradient_flows_and_bf16_input():
    r = Router(8, 4, 2, RouterConfig())
    x = torch.randn(6, 8).bfloat16()
    out = r(x, 3)
    assert out.gate_TK.dtype == torch.float32
    out.gate_TK.sum().backward()  # normalised to route_scale per token: gradient ~0 but defined
    assert r.weight.grad is not None


def test_logits_stay_fp32_under_autocast():
    # under bf16 autocast the matmul would round 0.9/0.8 logits; the router switches autocast off
    x = logit([[0.9, 0.8, 0.3, 0.1]])
    r = make_router(4, 2, route_scale=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x, 1)
    close(out.gate_TK, [[2.0 * 0.9 / 1.7, 2.0 * 0.8 / 1.7]], tol=1e-6)


# ---------------------------------------------------------------- bias update

def test_bias_update_rule():
    bias = torch.tensor([0.0, 0.1, -0.2, 0.0])
    update_expert_bias(bias, torch.tensor([10, 2, 4, 4]), 0.01)  # mean load 5
    close(bias, [-0.01, 0.11, -0.19, 0.01])
    update_expert_bias(bias, torch.tensor([3, 3, 3, 3]), 0.01)  # balanced: no change
    close(bias, [-0.01, 0.11, -0.19, 0.01])
    close(expert_bias_delta(torch.tensor([1, 2, 3]), 0.5), [0.5, 0.0, -0.5])
    assert router_mod.update_expert_bias is update_expert_bias  # the trainer imports it from router


def test_expert_bias_is_persistent_buffer():
    r = Router(8, 4, 2, RouterConfig())
    assert "expert_bias" in r.state_dict() and r.expert_bias.dtype == torch.float32
    assert [n for n, _ in r.named_parameters()] == ["weight"]
    assert r.global_group is None


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("E,K,kw,match", [
    (8, 2, dict(score_func="relu"), r"model\.moe\.router\.score_func='relu'.*sigmoid, softmax"),
    (8, 2, dict(drop_policy="random"), r"model\.moe\.router\.drop_policy='random'.*probs, position"),
    (8, 2, dict(group_by="racks"), r"model\.moe\.router\.group_by='racks'.*experts, ep_ranks, nodes"),
    (8, 2, dict(n_group=3), r"model\.moe\.router\.n_group=3.*divide model\.moe\.num_experts=8"),
    (8, 2, dict(n_group=0), r"model\.moe\.router\.n_group=0.*>= 1"),
    (8, 2, dict(n_group=4, topk_group=5), r"model\.moe\.router\.topk_group=5.*\[1, n_group=4\]"),
    (8, 2, dict(n_group=4, topk_group=0), r"model\.moe\.router\.topk_group=0"),
    (8, 3, dict(n_group=4, topk_group=1), r"model\.moe\.router\.topk_group=1.*2 experts.*top_k=3"),
    (8, 9, dict(), r"model\.moe\.top_k=9.*num_experts=8"),
    (8, 2, dict(aux_loss_coeff=-1.0), r"model\.moe\.router\.aux_loss_coeff=-1\.0.*>= 0"),
    (8, 2, dict(capacity_factor=float("nan")), r"model\.moe\.router\.capacity_factor=nan"),
    (8, 2, dict(route_scale=0.0), r"model\.moe\.router\.route_scale=0\.0.*> 0"),
])
def test_invalid_config(E, K, kw, match):
    with pytest.raises(ValueError, match=match):
        Router(8, E, K, RouterConfig(**kw))


def test_seq_len_must_divide_tokens():
    with pytest.raises(ValueError, match="seq_len=4"):
        Router(8, 4, 2, RouterConfig())(torch.randn(6, 8), 4)
