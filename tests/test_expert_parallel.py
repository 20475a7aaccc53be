"""Every DP/EP layout must match one process on the same model and data, step by step."""
from __future__ import annotations

import dataclasses
import math

import pytest

from tests.conftest import job_from
from tests.dist_utils import run_distributed

# fp32. Reduction order differs between layouts (nothing else may); Adam turns those 1e-7 rounding
# differences into slowly growing weight differences, so the test runs at a moderate lr (1e-3),
# where 10 steps stay within ~1e-6 (at 3e-3 with clipping active, grad norms drift to ~1.5e-5).
RTOL = 1e-5


def make_job(tmp_path, dp: int = 1, ep: int = 1, steps: int = 10, extra: list[str] | None = None):
    job = job_from([
        "model=deepseek_tiny", "data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false",
        f"train.steps={steps}", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_len=16",
        "train.eval_every=0", "train.warmup_steps=2", "train.dtype=fp32", "train.lr=0.001",
        f"parallel.dp={dp}", f"parallel.ep={ep}", f"cluster.num_workers={dp}", *(extra or []),
    ])
    job.run_dir = str(tmp_path)
    return job


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from moe.train.loop import train

    return train(make_job(tmp_path_factory.mktemp("ref")))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def assert_matches(summary, reference, what: str):
    for key in ("losses", "grad_norms", "aux_losses"):
        for step, (a, b) in enumerate(zip(summary[key], reference[key])):
            assert math.isfinite(a), f"{what}: {key}[{step}] = {a}"
            assert rel(a, b) <= RTOL or abs(a - b) < 1e-9, f"{what}: {key}[{step}] {a!r} vs one process {b!r}"


@pytest.mark.parametrize("dp, ep, extra", [(2, 1, []), (2, 2, []), (4, 2, []), (4, 4, []),
                                           (2, 2, ["train.deterministic=true"])],
                         ids=["dp2", "ep2", "ep2-edp2", "ep4", "ep2-deterministic"])
def test_layout_matches_single_process(tmp_path, reference, dp, ep, extra):
    """ep2-deterministic: every op of the EP step has a deterministic implementation (PyTorch raises
    on one that has none) and reads no buffer it did not write (PyTorch fills new ones with NaN)."""
    summaries = run_distributed(make_job(tmp_path, dp=dp, ep=ep, extra=extra), world=dp)
    assert len(reference["losses"]) == 10
    assert reference["losses"][-1] < reference["losses"][0]
    for rank, s in enumerate(summaries):
        assert_matches(s, reference, f"dp={dp} ep={ep} rank {rank}")


def _drop_expert_divisor():
    """Negative control: divide expert gradients by edp instead of dp (pytorch #160285's bug)."""
    import moe.parallel.grads as grads

    def bad_reduce(model, ctx):
        dense, experts = grads.split_params(model)
        grads._all_reduce_mean(grads._grads(dense), ctx.group("dp"), ctx.dp, ctx.dp)
        grads._all_reduce_mean(grads._grads(experts), ctx.group("edp"), ctx.edp, ctx.edp)

    import moe.train.loop as loop

    loop.reduce_gradients = bad_reduce


def test_negative_control_wrong_expert_scale_fails(tmp_path, reference):
    summaries = run_distributed(make_job(tmp_path, dp=2, ep=2, steps=3), world=2, patch=_drop_expert_divisor)
    with pytest.raises(AssertionError, match="grad_norms"):
        assert_matches(summaries[0], reference, "negative control")


def test_traffic_matches_independent_count(tmp_path):
    """Forced routing: token t of every rank goes to experts (t % 8) and ((t + 4) % 8); the test counts
    the rows each rank sends to each other rank itself and compares with the logged matrix."""
    import json

    job = make_job(tmp_path, dp=2, ep=2, steps=1)
    run_distributed(job, world=2, patch=_force_routing)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    m = rows[0]
    tokens = 2 * 16 * 2  # micro-batch x seq_len x accumulation steps on one rank
    expected = [[0, 0], [0, 0]]
    for _micro in range(2):
        for _seq in range(2):
            for pos in range(16):
                for e in (pos % 8, (pos + 4) % 8):
                    for src in range(2):
                        expected[src][e // 4] += 1
    for i in (1, 2, 3):
        assert m[f"traffic/matrix/layer_{i}"] == expected
        # Rank 0 sends its rows for experts 4..7 to rank 1: D floats each, fp32 on CPU.
        assert m[f"traffic/dispatch_bytes/layer_{i}"] == expected[0][1] * 128 * 4
    assert m["traffic/dispatch_bytes"] == 3 * expected[0][1] * 128 * 4
    assert m["traffic/combine_bytes"] == m["traffic/dispatch_bytes"]
    assert m["traffic/inter_node_bytes"] == 0
    uniform = tokens * 2 * (1 - 1 / 2) * 128 * 4
    assert m["traffic/expected_bytes_uniform"] == pytest.approx(3 * uniform)
    assert m["moe/ranks_per_token_mean"] == 2.0 and m["moe/ranks_per_token_max"] == 2


def _force_routing():
    import torch

    import moe.model.router as router_mod

    original = router_mod.Router.forward

    def forced(self, x_TD, seq_len):
        out = original(self, x_TD, seq_len)
        t = torch.arange(x_TD.shape[0]) % seq_len
        idx = torch.stack([t % 8, (t + 4) % 8], dim=-1)
        return dataclasses.replace(out, expert_idx_TK=idx, keep_TK=torch.ones_like(idx, dtype=torch.bool),
                                   tokens_per_expert_E=torch.bincount(idx.flatten(), minlength=8))

    router_mod.Router.forward = forced


@pytest.mark.parametrize("group_by, topk_group, max_ranks, max_nodes", [("nodes", 1, 2, 1), ("ep_ranks", 1, 1, 1),
                                                                       ("ep_ranks", 2, 2, 2)])
def test_node_limited_routing(tmp_path, group_by, topk_group, max_ranks, max_nodes):
    """ep=4 over two simulated nodes of two ranks: tying router groups to nodes (or ranks) bounds how far
    each token's experts spread, and the logged inter-node bytes follow from the logged matrix."""
    import json

    job = make_job(tmp_path, dp=4, ep=4, steps=2, extra=[
        f"model.moe.router.group_by={group_by}", f"model.moe.router.topk_group={topk_group}",
        "parallel.allow_cross_node_ep=true"])
    run_distributed(job, world=4, node_of_rank=[0, 0, 1, 1])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    node = [0, 0, 1, 1]
    for m in rows:
        assert m["moe/nodes_per_token_max"] <= max_nodes
        assert m["moe/ranks_per_token_max"] <= max_ranks
        inter = 0
        for i in (1, 2, 3):
            matrix = m[f"traffic/matrix/layer_{i}"]
            layer_inter = sum(matrix[0][dst] for dst in range(4) if node[dst] != node[0]) * 128 * 4 * 2
            assert m[f"traffic/inter_node_bytes/layer_{i}"] == layer_inter
            inter += layer_inter
        assert m["traffic/inter_node_bytes"] == inter
        # Counted independently from the routing decisions (expert -> rank -> node), it agrees exactly.
        assert m["traffic/inter_node_bytes_from_routing"] == inter
    if group_by == "nodes":  # tokens do cross nodes here (a token's one node need not be its own)
        assert any(m["traffic/inter_node_bytes"] > 0 for m in rows)
