"""Observability metrics against independent computations on forced routings.

The forced routing (`skewed_routing`): token at position p of its sequence goes to experts 0 and
1 + p % 5, so expert 0 gets every token, experts 1..5 share the rest and experts 6, 7 get nothing.
The tests count the same thing with plain Python and compare with what the loop logged."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import pytest
import torch

from moe.model.moe import balanced_routing
from moe.model.router import RouterOutput
from moe.train.load_metrics import layer_load_metrics
from moe.train.mfu import mfu, training_flops_per_token
from moe.train.observability import imbalance_wait
from moe.train.timing import RegionTimer
from tests.conftest import job_from
from tests.dist_utils import run_distributed

E, K = 8, 2


def skewed_experts(p: int) -> tuple[int, int]:
    return 0, 1 + p % 5


def skewed_routing():
    """Patch Router.forward (module level: the spawned ranks call it too)."""
    import moe.model.router as router_mod

    original = router_mod.Router.forward

    def forced(self, x_TD, seq_len):
        out = original(self, x_TD, seq_len)
        p = torch.arange(x_TD.shape[0]) % seq_len
        idx = torch.stack([torch.zeros_like(p), 1 + p % 5], dim=-1)
        return dataclasses.replace(out, expert_idx_TK=idx, keep_TK=torch.ones_like(idx, dtype=torch.bool),
                                   tokens_per_expert_E=torch.bincount(idx.flatten(), minlength=E))

    router_mod.Router.forward = forced


def independent_load_metrics(counts: list[int], ep: int) -> dict[str, float]:
    """The definitions, in plain Python."""
    total = sum(counts)
    mean = total / len(counts)
    var = sum((c - mean) ** 2 for c in counts) / len(counts)
    p = [c / total for c in counts if c > 0]
    per_rank = [sum(counts[r * len(counts) // ep:(r + 1) * len(counts) // ep]) for r in range(ep)]
    return {
        "overload_factor": max(counts) / mean, "min_load_factor": min(counts) / mean,
        "load_cv": math.sqrt(var) / mean, "dead_experts": float(sum(c == 0 for c in counts)),
        "expert_diversity": math.exp(-sum(q * math.log(q) for q in p)) / len(counts),
        "rank_overload_factor": max(per_rank) / (sum(per_rank) / ep),
    }


def skewed_counts(tokens_per_seq: int, sequences: int) -> list[int]:
    counts = [0] * E
    for _ in range(sequences):
        for pos in range(tokens_per_seq):
            for e in skewed_experts(pos):
                counts[e] += 1
    return counts


# ---------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_layer_metrics_match_definitions(ep):
    for counts in ([5, 0, 3, 9, 1, 0, 2, 4], [4] * 8, skewed_counts(32, 4)):
        got = layer_load_metrics(torch.tensor(counts), ep)
        want = independent_load_metrics(counts, ep)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-12), (k, counts)


def test_imbalance_metrics_move_the_right_way():
    uniform = layer_load_metrics(torch.full((E,), 16), ep=2)
    assert uniform["overload_factor"] == 1.0 and uniform["load_cv"] == 0.0 and uniform["expert_diversity"] == pytest.approx(1.0)
    previous = uniform
    # More and more of the same 128 assignments moved onto expert 0 (rank 0).
    for moved in (4, 8, 14):
        counts = torch.full((E,), 16)
        counts[0] += moved * 7
        counts[1:] -= moved
        m = layer_load_metrics(counts, ep=2)
        assert m["overload_factor"] > previous["overload_factor"]
        assert m["min_load_factor"] < previous["min_load_factor"]
        assert m["load_cv"] > previous["load_cv"]
        assert m["expert_diversity"] < previous["expert_diversity"]
        assert m["rank_overload_factor"] > previous["rank_overload_factor"]
        previous = m
    dead = layer_load_metrics(torch.tensor([32, 32, 32, 32, 0, 0, 0, 0]), ep=2)
    assert dead["dead_experts"] == 4 and dead["min_load_factor"] == 0.0 and dead["rank_overload_factor"] == 2.0


def test_balanced_routing_keeps_shapes_and_balances():
    T = 37  # not a multiple of E: loads differ by at most one
    idx_TK = torch.zeros(T, K, dtype=torch.int64)
    gate_TK = torch.rand(T, K)
    routed = RouterOutput(idx_TK, gate_TK, torch.ones(T, K, dtype=torch.bool), torch.bincount(idx_TK.flatten(), minlength=E),
                          torch.zeros(()), {"dropped": torch.tensor(0)})
    out = balanced_routing(routed, E)
    assert out.expert_idx_TK.shape == (T, K) and out.gate_TK is gate_TK and bool(out.keep_TK.all())
    counts = torch.bincount(out.expert_idx_TK.flatten(), minlength=E)
    assert torch.equal(counts, out.tokens_per_expert_E) and counts.max() - counts.min() <= 1
    assert all(len(set(row)) == K for row in out.expert_idx_TK.tolist())  # a token's experts are distinct


def test_region_timer_measures_forward_and_backward_on_cpu():
    class Sleepy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            time.sleep(0.03)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            time.sleep(0.06)
            return g * 2

    timer = RegionTimer(torch.device("cpu"))
    x = torch.ones(3, requires_grad=True)
    span = timer.span("r")
    y = span.exit(Sleepy.apply(span.enter(x)))
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 6.0))  # the marks are identities for values and gradients
    fwd, bwd = timer.collect()["r"]
    assert 0.03 <= fwd < 0.03 + 0.05 and 0.06 <= bwd < 0.06 + 0.05


def test_imbalance_wait_definition():
    after_RL = torch.tensor([[1.0, 0.5], [3.0, 0.5], [2.0, 0.9]])  # ranks x layers
    mean_L, max_L = imbalance_wait(after_RL)
    assert mean_L.tolist() == pytest.approx([(0 + 2 + 1) / 3, (0 + 0 + 0.4) / 3])
    assert max_L.tolist() == pytest.approx([2.0, 0.4])


def test_flops_per_token_counts_the_built_model():
    """6 x (parameters a token multiplies with, counted on the real model) + PaLM's attention term."""
    from moe.model.transformer import build_model

    job = job_from(["model=deepseek_tiny"])
    m = job.model
    model = build_model(m, 0)
    used = 0
    for name, p in model.named_parameters():
        if name.startswith("tok_embeddings"):
            continue  # a lookup, no multiply
        used += p.numel() * m.moe.top_k // m.moe.num_experts if ".experts." in name else p.numel()
    attn = 6 * m.num_layers * m.num_heads * 64 * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    assert training_flops_per_token(m, 64) == 6 * used + attn
    assert mfu(1e9, 1000, 2.0, 4, 1e12) == pytest.approx(1e12 / (2.0 * 4 * 1e12))
    assert mfu(1e9, 1000, 2.0, 4, None) is None


# ---------------------------------------------------------------------------------------- runs
def _job(tmp_path, extra: list[str] | None = None):
    job = job_from([
        "model=deepseek_tiny", "data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false",
        "train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_len=16",
        "train.eval_every=0", "train.warmup_steps=1", "train.dtype=fp32", "logger.plot_every=1", *(extra or []),
    ])
    job.run_dir = str(tmp_path)
    return job


def _rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]


def test_forced_routing_metrics_single_process(tmp_path):
    from moe.train.loop import train
    import moe.model.router as router_mod

    original = router_mod.Router.forward
    try:
        skewed_routing()
        train(_job(tmp_path))
    finally:
        router_mod.Router.forward = original
    want = independent_load_metrics(skewed_counts(16, 4), ep=1)  # 4 sequences per step on the one rank
    for m in _rows(tmp_path):
        for i in (1, 2, 3):
            for k, v in want.items():
                assert m[f"moe/{k}/layer_{i}"] == pytest.approx(v, rel=1e-12), k
        assert m["moe/dead_experts"] == 3 * 2  # summed over the three MoE layers
        assert m["moe/overload_factor"] == pytest.approx(want["overload_factor"])
        assert m["moe/dropped_fraction"] == 0.0
        # ep=1: nothing crosses ranks, no all-to-all time, no wait; the experts were timed.
        for k in ("traffic/dispatch_bytes", "traffic/combine_bytes", "traffic/inter_node_bytes",
                  "traffic/a2a_time_s", "moe/imbalance_wait_s"):
            assert m[k] == 0, k
        assert m["traffic/a2a_gbps"] is None and m["perf/mfu"] is None and m["perf/max_memory_gib"] is None
        assert 0 < m["perf/expert_compute_time_s"] < m["perf/step_time_s"]
        assert m["perf/expert_compute_time_s"] == pytest.approx(
            sum(m[f"perf/expert_compute_time_s/layer_{i}"] for i in (1, 2, 3)))
        for legacy, name in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                             ("tokens_per_s", "perf/tokens_per_s"), ("step_time_s", "perf/step_time_s")):
            assert m[legacy] == m[name]
    media = [json.loads(line) for line in open(tmp_path / "media.jsonl")]
    assert [r["step"] for r in media] == [0, 1]
    assert os.path.isfile(tmp_path / media[0]["moe/tokens_per_expert_heatmap"]["image"])
    # The histogram holds every layer's per-expert count: 3 layers x the forced counts.
    assert sorted(media[0]["moe/expert_load_hist"]["histogram"]) == sorted(skewed_counts(16, 4) * 3)


def test_force_balanced_routing_flattens_the_load(tmp_path):
    from moe.train.loop import train

    train(_job(tmp_path, ["train.force_balanced_routing=true", "logger.plot_every=0"]))
    for m in _rows(tmp_path):
        # 2 micro-batches x 32 tokens x top-2 = 128 assignments over 8 experts: exactly 16 each.
        assert m["moe/overload_factor"] == 1.0 and m["moe/min_load_factor"] == 1.0
        assert m["moe/dead_experts"] == 0 and m["moe/expert_diversity"] == pytest.approx(1.0)


def test_forced_routing_metrics_expert_parallel(tmp_path):
    """ep=2, two gloo ranks: load factors over ranks, bytes, timing and the traffic picture."""
    job = _job(tmp_path, ["parallel.dp=2", "parallel.ep=2", "cluster.num_workers=2", "train.steps=1"])
    run_distributed(job, world=2, patch=skewed_routing)
    m = _rows(tmp_path)[0]
    want = independent_load_metrics(skewed_counts(16, 4), ep=2)  # 2 ranks x 2 sequences, global counts
    for i in (1, 2, 3):
        for k, v in want.items():
            assert m[f"moe/{k}/layer_{i}"] == pytest.approx(v, rel=1e-12), k
    # Each rank has 2 sequences of 16 tokens; EP rank 0 holds experts 0..3, rank 1 experts 4..7.
    matrix = [[0, 0], [0, 0]]
    for src in range(2):
        for e, n in enumerate(skewed_counts(16, 2)):
            matrix[src][e // 4] += n
    row_bytes = 128 * 4  # hidden 128, fp32
    for i in (1, 2, 3):
        assert m[f"traffic/matrix/layer_{i}"] == matrix
    assert m["traffic/dispatch_bytes"] == 3 * matrix[0][1] * row_bytes > 0
    assert m["traffic/combine_bytes"] == m["traffic/dispatch_bytes"]
    assert m["traffic/a2a_time_s"] > 0 and m["moe/imbalance_wait_s"] >= 0
    assert m["moe/imbalance_wait_max_s"] >= m["moe/imbalance_wait_s"]
    sent = 2 * (m["traffic/dispatch_bytes"] + m["traffic/combine_bytes"])  # forward and backward
    assert m["traffic/a2a_gbps"] == pytest.approx(sent / m["traffic/a2a_time_s"] / 1e9)
    assert m["traffic/a2a_time_s"] == pytest.approx(sum(m[f"traffic/a2a_time_s/layer_{i}"] for i in (1, 2, 3)))
    media = [json.loads(line) for line in open(tmp_path / "media.jsonl")]
    assert os.path.isfile(tmp_path / media[0]["traffic/matrix_heatmap"]["image"])
