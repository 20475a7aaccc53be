"""Tensor parallelism (with sequence parallel) must match one process on the same model and data.

MLA (deepseek_tiny) and a GQA variant, at tp=2 and tp=2 x ep=2 (dp=2), 10 steps in fp32: losses,
balancing losses and gradient norms within 1e-5 relative. The GQA variant also turns on every
balancing loss and a capacity limit, so the whole-sequence counting of moe.model.sharded_balancing is
checked too. A negative control drops the tp sum of the router's gradients and must fail.
"""
from __future__ import annotations

import pytest

from launcher.config import ConfigError
from tests.conftest import job_from
from tests.dist_utils import run_distributed, spawn
from tests.test_expert_parallel import assert_matches

MODELS = {
    "mla": ["model.num_layers=2"],
    # Every balancing loss on and a capacity that drops tokens: counted over whole sequences.
    "gqa": ["model.num_layers=2", "model.attention=gqa", "model.num_kv_heads=2", "model.head_dim=32",
            "model.moe.router.aux_loss_coeff=0.01",
            "model.moe.router.z_loss_coeff=0.001", "model.moe.router.capacity_factor=1.0"],
}


def make_job(tmp_path, model: str, dp: int = 1, tp: int = 1, ep: int = 1, steps: int = 10,
             extra: list[str] | None = None):
    job = job_from([
        "model=deepseek_tiny", "data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false",
        f"train.steps={steps}", "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_len=16",
        "train.eval_every=0", "train.warmup_steps=2", "train.dtype=fp32", "train.lr=0.001",
        f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.ep={ep}", f"cluster.num_workers={dp * tp}",
        *MODELS[model], *(extra or []),
    ])
    job.run_dir = str(tmp_path)
    return job


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    from moe.train.loop import train

    return {m: train(make_job(tmp_path_factory.mktemp(f"ref-{m}"), m)) for m in MODELS}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("dp, tp, ep", [(1, 2, 1), (2, 2, 2)], ids=["tp2", "tp2-ep2-dp2"])
def test_tensor_parallel_matches_single_process(tmp_path, references, model, dp, tp, ep):
    ref = references[model]
    assert len(ref["losses"]) == 10 and ref["losses"][-1] < ref["losses"][0]
    summaries = run_distributed(make_job(tmp_path, model, dp=dp, tp=tp, ep=ep), world=dp * tp)
    for rank, s in enumerate(summaries):
        assert_matches(s, ref, f"{model} dp={dp} tp={tp} ep={ep} rank {rank}")


def _skip_tp_sum_of_moe_grads():
    """Negative control: treat the router's and the experts' gradients as complete on each tp rank (dp=1,
    so nothing sums them), i.e. forget that the tp ranks route different tokens."""
    import torch.distributed.tensor as dt

    import moe.parallel.grads as grads

    original = grads._reduce_tp_partial

    def dtensors_only(params, ctx):
        return original([p for p in params if isinstance(p, dt.DTensor)], ctx)

    grads._reduce_tp_partial = dtensors_only
    grads.split_params = lambda model: ([p for _, p in model.named_parameters()], [])


def test_negative_control_missing_tp_sum_of_moe_grads_fails(tmp_path, references):
    summaries = run_distributed(make_job(tmp_path, "mla", tp=2, steps=3), world=2, patch=_skip_tp_sum_of_moe_grads)
    got, want = summaries[0]["grad_norms"][0], references["mla"]["grad_norms"][0]
    assert abs(got - want) / want > 1e-3, (got, want)  # the first step's norm is visibly off, not rounding
    with pytest.raises(AssertionError, match="vs one process"):
        assert_matches(summaries[0], references["mla"], "negative control")


def _sharded_router_vs_whole(rank: int, world: int) -> dict[str, float]:
    """One router on a [2, 8] micro-batch, once whole and once as `world` sequence slices; returns the
    largest relative differences of everything the slices must reproduce."""
    import torch
    import torch.distributed as dist

    from moe.config import RouterConfig
    from moe.model.router import Router

    out: dict[str, float] = {}
    for policy in ("probs", "position"):
        cfg = RouterConfig(n_group=2, topk_group=1, aux_loss_coeff=0.01, seq_aux_loss_coeff=0.01,
                           global_aux_loss_coeff=0.01, z_loss_coeff=0.001, capacity_factor=1.0, drop_policy=policy)
        torch.manual_seed(0)
        B, S, D, s = 2, 8, 16, 8 // world
        x_BSD = torch.randn(B, S, D)
        w_BSK = torch.randn(B, S, 2)  # weights the gates into a loss, so their gradients are checked too
        whole, sliced = Router(D, 8, 2, cfg, init_std=0.5), Router(D, 8, 2, cfg, init_std=0.5)
        sliced.load_state_dict(whole.state_dict())
        sliced.seq_shard_group = sliced.global_group = dist.group.WORLD

        x_all = x_BSD.clone().requires_grad_()
        ref = whole(x_all.reshape(B * S, D), S)
        (ref.aux_loss + (ref.gate_TK * w_BSK.reshape(B * S, 2)).sum()).backward()
        part = slice(rank * s, (rank + 1) * s)
        x_loc = x_BSD[:, part].clone().requires_grad_()
        got = sliced(x_loc.reshape(B * s, D), s)
        (got.aux_loss + (got.gate_TK * w_BSK[:, part].reshape(B * s, 2)).sum()).backward()
        grad_w = sliced.weight.grad.clone()
        dist.all_reduce(grad_w)  # the rule of moe.parallel.grads: router gradients add up over tp

        def rel(a, b):
            return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()

        def local(t_TK):
            return t_TK.view(B, S, -1)[:, part].reshape(B * s, -1)

        out[f"{policy}/aux_loss"] = rel(got.aux_loss, ref.aux_loss)
        for k in ref.metrics:
            out[f"{policy}/{k}"] = rel(got.metrics[k].float(), ref.metrics[k].float())
        out[f"{policy}/keep"] = float((got.keep_TK != local(ref.keep_TK)).sum())
        out[f"{policy}/gate"] = rel(got.gate_TK, local(ref.gate_TK))
        out[f"{policy}/router_grad"] = rel(grad_w, whole.weight.grad)
        out[f"{policy}/x_grad"] = rel(x_loc.grad, x_all.grad[:, part])
        out[f"{policy}/dropped_any"] = float(ref.metrics["dropped"])
    return out


def test_sequence_sliced_router_matches_whole_micro_batch():
    """Every balancing loss (value and gradient), the capacity keep mask of both drop policies and the
    dropped count, routed as two sequence slices, equal routing the whole micro-batch."""
    for rank, diffs in enumerate(spawn(_sharded_router_vs_whole, 2)):
        for key, d in diffs.items():
            if key.endswith("dropped_any"):
                assert d > 0, "the capacity must drop something for the test to mean anything"
            else:
                assert d <= 1e-6, f"rank {rank}: {key} differs by {d}"


def _one_step_grads_vs_whole(rank: int, world: int, overrides: list[str]) -> dict[str, float]:
    """One forward/backward of (LM + balancing loss) at tp=`world` after grads.reduce_gradients, against
    one process: the largest relative difference of every parameter's whole gradient, and of the norm."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    from moe.config import ParallelConfig
    from moe.model.transformer import build_model
    from moe.parallel.grads import global_grad_norm, reduce_gradients
    from moe.parallel.mesh import build_parallel_context
    from moe.parallel.tensor_parallel import apply_tensor_parallel

    job = job_from(["model=deepseek_tiny", "model.num_layers=2", "model.moe.router.z_loss_coeff=0.01", *overrides])
    tokens_BS = torch.randint(0, job.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens_BS[:, :-1], tokens_BS[:, 1:]
    whole, sharded = build_model(job.model, 0), build_model(job.model, 0)
    ctx = build_parallel_context(ParallelConfig(tp=world), "cpu")
    apply_tensor_parallel(sharded, ctx.mesh["tp"])
    for model in (whole, sharded):
        logits = model(inputs)
        (F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + model.aux_loss()).backward()
    reduce_gradients(sharded, ctx)
    out = {}
    for (name, p), q in zip(whole.named_parameters(), sharded.parameters()):
        g = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
        out[name] = ((g - p.grad).abs().max() / p.grad.abs().max()).item()
    norm = torch.cat([p.grad.flatten() for p in whole.parameters()]).double().norm().item()  # fp32 is ~1e-4 off
    out["grad_norm"] = abs(global_grad_norm(sharded, ctx) - norm) / norm
    return out


def test_one_step_gradients_match_whole_model_mla_with_query_compression():
    """Every parameter's reduced gradient and the gradient norm, for MLA with query compression (wq_a,
    q_norm, wq_b replicated or column-parallel), which the training comparisons (q_lora_rank=0) skip."""
    for rank, diffs in enumerate(spawn(_one_step_grads_vs_whole, 2, ["model.q_lora_rank=32"])):
        bad = {k: d for k, d in diffs.items() if not d <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("overrides, pattern", [
    (["model.num_heads=6"], r"model\.num_heads=6: must be divisible by parallel\.tp=4"),
    (["model.attention=gqa", "model.num_heads=8", "model.num_kv_heads=2"],
     r"model\.num_kv_heads=2: must be divisible by parallel\.tp=4"),
    (["model.dense_intermediate_size=390"], r"model\.dense_intermediate_size=390: must be divisible"),
    (["model.moe.expert_intermediate_size=130"], r"expert_intermediate_size \* model\.moe\.num_shared_experts = 130"),
    (["train.seq_len=18"], r"train\.seq_len=18: must be divisible by parallel\.tp=4 \(sequence parallel"),
    (["model.vocab_size=4098", "data.tokenizer_vocab_size=4096"], r"model\.vocab_size=4098: must be divisible"),
    # With pipeline stages too, every stage is split the same way: the same rules still apply.
    (["parallel.pp=2", "cluster.num_workers=8", "train.global_batch_size=32", "train.seq_len=18"],
     r"train\.seq_len=18: must be divisible by parallel\.tp=4"),
])
def test_tp_divisibility_is_checked(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        job_from(["parallel.tp=4", "cluster.num_workers=4", *overrides])


def test_tp_layout_is_accepted():
    job = job_from(["parallel.tp=2", "parallel.ep=2", "parallel.dp=2", "cluster.num_workers=4"])
    assert (job.parallel.tp, job.parallel.ep) == (2, 2)
    # With pipeline parallelism (tests/test_tp_pp.py trains it): ep borrows from dp*tp of each stage.
    job = job_from(["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "cluster.num_workers=4",
                    "train.global_batch_size=8", "train.micro_batch_size=2"])
    assert (job.parallel.tp, job.parallel.pp, job.parallel.ep) == (2, 2, 2)


def test_checkpoint_saved_at_tp2_resumes_at_tp2_and_on_one_process(tmp_path):
    """DTensor weights and moments go through DCP: a tp=2 checkpoint resumes at tp=2 and on one process,
    and both continue exactly as the uninterrupted tp=2 run."""
    full = run_distributed(make_job(tmp_path / "a", "mla", tp=2, steps=4, extra=["train.checkpoint_every=2"]),
                           world=2)[0]
    folder = tmp_path / "a" / "checkpoints" / "step_00000001"
    assert (folder / "manifest.json").is_file()
    resume = [f"train.resume={folder}", "train.checkpoint_every=0"]
    again_tp2 = run_distributed(make_job(tmp_path / "b", "mla", tp=2, steps=4, extra=resume), world=2)[0]
    from moe.train.loop import train

    one = train(make_job(tmp_path / "c", "mla", steps=4, extra=resume))
    for what, s in (("tp=2 -> tp=2", again_tp2), ("tp=2 -> one process", one)):
        assert s["start_step"] == 2
        for key in ("losses", "grad_norms"):
            for step in (2, 3):
                a, b = s[key][step], full[key][step]
                assert abs(a - b) <= 1e-5 * abs(b), f"{what}: {key}[{step}] {a} vs uninterrupted {b}"
