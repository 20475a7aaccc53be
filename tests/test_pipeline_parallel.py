"""Pipeline parallelism must match one process on the same model and data, step by step.

The runs turn on the Switch aux loss and the z-loss on top of deepseek_tiny's sequence loss, so the
balancing-loss gradients that every stage injects into its backward (moe/parallel/pipeline.py) matter
at the tolerance checked: the negative controls (no injection; the injected gradient not divided by the
micro-batch count) fail it by orders of magnitude.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from launcher.config import ConfigError
from tests.conftest import job_from
from tests.dist_utils import run_distributed

RTOL = 1e-5  # as tests/test_expert_parallel.py: fp32, only reduction order differs
LOSSES = ["model.moe.router.aux_loss_coeff=0.01", "model.moe.router.z_loss_coeff=0.001"]


def make_job(run_dir, dp: int = 1, ep: int = 1, pp: int = 1, steps: int = 10, extra: list[str] | None = None,
             tp: int = 1):
    job = job_from([
        "model=deepseek_tiny", "data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false",
        f"train.steps={steps}", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_len=16",
        "train.eval_every=5", "train.eval_batches=2", "train.warmup_steps=2", "train.dtype=fp32", "train.lr=0.001",
        f"parallel.dp={dp}", f"parallel.ep={ep}", f"parallel.pp={pp}", f"parallel.tp={tp}",
        f"cluster.num_workers={dp * tp * pp}",
        *LOSSES, *(extra or []),
    ])
    job.run_dir = str(run_dir)
    return job


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in this process, as the spawned ranks use: on a shared 2-core machine a second
    thread makes the in-process runs several times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from moe.train.loop import train

    run_dir = tmp_path_factory.mktemp("ref")
    return train(make_job(run_dir)), rows(run_dir)


def worst_diff(summary, ref) -> dict[str, float]:
    out = {}
    for key in ("losses", "grad_norms", "aux_losses"):
        assert len(summary[key]) == len(ref[key])
        assert all(math.isfinite(a) for a in summary[key])
        out[key] = max(rel(a, b) for a, b in zip(summary[key], ref[key]))
    return out


# Per-layer and summary moe/* keys that depend on the layout by definition or on the clock.
LAYOUT_KEYS = ("imbalance_wait", "rank_overload_factor", "ranks_per_token", "nodes_per_token")


@pytest.mark.parametrize("dp, ep, pp", [(1, 1, 2), (2, 2, 2)], ids=["pp2", "pp2-ep2"])
def test_pipeline_matches_single_process(tmp_path, reference, dp, ep, pp):
    ref, ref_rows = reference
    assert ref["losses"][-1] < ref["losses"][0]
    summaries = run_distributed(make_job(tmp_path, dp=dp, ep=ep, pp=pp), world=dp * pp)
    for rank, s in enumerate(summaries):  # every rank holds the global loss and norm after the pp reductions
        worst = worst_diff(s, ref)
        print(f"dp={dp} ep={ep} pp={pp} rank {rank}: max relative difference {worst}")
        assert all(v <= RTOL for v in worst.values()), (rank, worst)
        if dp == 1:  # evaluation reads eval_batches windows per dp rank: the same windows only at dp=1
            assert rel(s["eval_loss"], ref["eval_loss"]) <= RTOL
    # The balancing losses and expert-load metrics of both stages' layers reach the log, equal to one
    # process's: bit for bit on the first step with dp=1 (same weights, nothing summed in another order),
    # within RTOL after weights have picked up the gradient norm's rounding differences.
    assert_logged_metrics_match(rows(tmp_path), ref_rows, ep, exact_first_step=dp == 1)


def assert_logged_metrics_match(got: list[dict], ref_rows: list[dict], ep: int, exact_first_step: bool) -> None:
    """Every layout-independent moe/* metric of every step, and loss, aux_loss and grad_norm, as one
    process logged them (the first step bit for bit where asked); traffic of every layer with ep > 1."""
    assert len(got) == len(ref_rows) == 10
    for step, (a, b) in enumerate(zip(got, ref_rows)):
        tol = 0.0 if exact_first_step and step == 0 else RTOL
        moe_keys = [k for k in b if k.startswith("moe/") and not any(x in k for x in LAYOUT_KEYS)]
        assert {f"moe/load_balancing_loss/layer_{i}" for i in (1, 2, 3)} <= set(moe_keys)
        for k in moe_keys:
            assert k in a, f"step {step}: {k} missing"
            assert rel(a[k], b[k]) <= tol or abs(a[k] - b[k]) < 1e-12, f"step {step}: {k} {a[k]!r} vs {b[k]!r}"
        assert "moe/imbalance_wait_s/layer_3" in a  # timing of the last stage's layer reaches rank 0 too
        for k in ("loss", "aux_loss", "grad_norm"):
            assert rel(a[k], b[k]) <= RTOL
        if ep > 1:  # every layer's traffic (stage 0 owns layers 1-2, stage 1 layer 3); totals add up
            per_layer = [a[f"traffic/dispatch_bytes/layer_{i}"] for i in (1, 2, 3)]
            assert a["traffic/dispatch_bytes"] == sum(per_layer) > 0
            assert all(len(a[f"traffic/matrix/layer_{i}"]) == ep for i in (1, 2, 3))


def test_stage_without_moe_layers(tmp_path, reference):
    """pp=4 on deepseek_tiny: stage 0 holds only the dense layer 0 (and the embeddings), so it has no
    MoE metrics of its own and contributes zeros to every pp reduction; nothing hangs, values match."""
    ref, ref_rows = reference
    summaries = run_distributed(make_job(tmp_path, pp=4, steps=2, extra=["train.eval_every=0"]), world=4)
    for s in summaries:
        worst = {k: max(rel(a, b) for a, b in zip(s[k], ref[k][:2])) for k in ("losses", "grad_norms", "aux_losses")}
        assert all(v <= RTOL for v in worst.values()), worst
    a, b = rows(tmp_path)[0], ref_rows[0]
    for i in (1, 2, 3):
        assert a[f"moe/load_balancing_loss/layer_{i}"] == b[f"moe/load_balancing_loss/layer_{i}"]
        assert a[f"moe/overload_factor/layer_{i}"] == b[f"moe/overload_factor/layer_{i}"]


def _no_aux_injection():
    """Negative control: the stages drop their balancing-loss gradients."""
    import moe.parallel.pipeline as pl

    pl.AuxLossInjector.apply = staticmethod(lambda h, aux, scale: h)


def _aux_scale_not_divided():
    """Negative control: the injected gradient is not divided by the micro-batch count."""
    import moe.parallel.pipeline as pl

    apply = pl.AuxLossInjector.apply
    pl.AuxLossInjector.apply = staticmethod(lambda h, aux, scale: apply(h, aux, 1.0))


@pytest.mark.parametrize("patch", [_no_aux_injection, _aux_scale_not_divided], ids=["no-injection", "wrong-scale"])
def test_negative_control_aux_gradient_fails(tmp_path, reference, patch):
    ref, _ = reference
    s = run_distributed(make_job(tmp_path, pp=2, steps=2, extra=["train.eval_every=0"]), world=2, patch=patch)[0]
    worst = {k: max(rel(a, b) for a, b in zip(s[k], ref[k][:2])) for k in ("losses", "grad_norms")}
    print(f"negative control {patch.__name__}: {worst}")
    assert worst["grad_norms"] > 100 * RTOL


def test_pipeline_checkpoint_loads_on_one_process(tmp_path):
    """A pp=2 checkpoint (each stage writes its own layers under layout-independent names) resumes on
    one process: the step after it matches the pp=2 run's."""
    from moe.train import checkpoint
    from moe.train.loop import train

    pp_dir = tmp_path / "pp2"
    pp_run = run_distributed(make_job(pp_dir, pp=2, steps=3, extra=["train.checkpoint_every=2", "train.eval_every=0"]),
                             world=2)[0]
    folders = checkpoint.complete_checkpoints(str(pp_dir / "checkpoints"))
    assert [s for s, _ in folders] == [1, 2]
    one_dir = tmp_path / "one"
    resumed = train(make_job(one_dir, steps=3, extra=[f"train.resume={folders[0][1]}", "train.eval_every=0"]))
    assert resumed["start_step"] == 2
    # The loss is a forward pass only, the same operations in the same order on one process as through
    # the stages: equal bit for bit only if every parameter (and expert bias) loaded identically.
    assert resumed["losses"][-1] == pp_run["losses"][2]
    assert rel(resumed["grad_norms"][-1], pp_run["grad_norms"][2]) <= RTOL
    # Every key of the one-process model is in the checkpoint (expert biases included), none is left over.
    from moe.model.transformer import build_model
    from moe.parallel.mesh import ParallelContext
    from moe.train.optim import build_optimizer

    job = make_job(one_dir, steps=3)
    model = build_model(job.model, 0)
    wanted = set(checkpoint._state_views(model, build_optimizer(model, job.train), ParallelContext(), True))
    import torch.distributed.checkpoint as dcp

    stored = set(dcp.FileSystemReader(folders[0][1]).read_metadata().state_dict_metadata)
    assert wanted == stored


# ---------------------------------------------------------------------------------------- stage split
def test_stage_split_balances_cost():
    from moe.parallel.pipeline import layer_costs, split_layers, stage_layers

    assert split_layers([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert split_layers([1, 1, 1, 1], 2, last_extra=2) == [range(0, 3), range(3, 4)]
    assert split_layers([4, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]
    assert split_layers([1, 2, 3], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="cannot split 2 layers into 3"):
        split_layers([1, 1], 3)
    tiny = job_from(["model=deepseek_tiny"]).model
    costs, embed, head = layer_costs(tiny, 16)
    assert embed == 0 and head == 2 * tiny.hidden_size * tiny.vocab_size
    # MoE layers count what a token visits: top_k routed + shared experts, not all num_experts.
    m = tiny.moe
    assert costs[1] - costs[0] == 2 * (m.num_experts * tiny.hidden_size + 3 * tiny.hidden_size
                                       * (m.expert_intermediate_size * (m.top_k + m.num_shared_experts)
                                          - tiny.dense_intermediate_size))
    # The head (4096 x 128) costs more than two layers here: the last stage gets one layer.
    assert stage_layers(tiny, 2, 16) == [range(0, 3), range(3, 4)]
    small = job_from(["model=deepseek_small"]).model
    assert stage_layers(small, 2, 2048) == [range(0, 5), range(5, 8)]


def test_config_checks_for_pipeline():
    base = ["model=deepseek_tiny", "parallel.pp=2", "cluster.num_workers=2"]
    job = job_from(base + ["train.global_batch_size=8", "train.micro_batch_size=2"])
    assert job.parallel.pp == 2
    with pytest.raises(ConfigError, match=r"parallel\.pp=8: more pipeline stages than model\.num_layers=4"):
        job_from(["model=deepseek_tiny", "parallel.pp=8", "cluster.num_workers=8", "train.global_batch_size=64",
                  "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match=r"parallel\.pp=2: the 1F1B pipeline schedule needs at least pp "
                                          r"micro-batches per step.* = 1; raise train\.global_batch_size to 8"):
        job_from(base + ["parallel.dp=1", "train.global_batch_size=4", "train.micro_batch_size=4"])
    # tp x pp is a layout like any other (tests/test_tp_pp.py); its micro-batch count is counted over dp only,
    # since the tp ranks of a stage share their sequences.
    job = job_from(base + ["parallel.tp=2", "cluster.num_workers=4", "train.global_batch_size=8",
                           "train.micro_batch_size=2"])
    assert (job.parallel.pp, job.parallel.tp) == (2, 2)
    with pytest.raises(ConfigError, match=r"parallel\.pp=2: the 1F1B pipeline schedule needs at least pp "
                                          r"micro-batches per step.* = 1"):
        job_from(base + ["parallel.tp=2", "parallel.dp=2", "cluster.num_workers=8", "train.global_batch_size=4",
                         "train.micro_batch_size=2"])


def test_aux_injector_gradient():
    from moe.parallel.pipeline import AuxLossInjector

    h = torch.randn(3, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    aux = w * 3.0
    out = AuxLossInjector.apply(h * 1.0, aux, 0.25)
    out.sum().backward()
    assert torch.equal(h.grad, torch.ones(3))
    assert w.grad.item() == 3.0 * 0.25  # d(aux * 0.25)/dw, as ((ce + aux) / 4).backward() gives


@pytest.mark.slow
def test_launcher_trains_with_pp2_on_local_ray(tmp_path):
    """`python -m launcher ... parallel.pp=2 cluster.num_workers=2` end to end on CPU workers."""
    from tests.test_launcher import TRAIN, launch

    run = tmp_path / "run"
    res = launch(run, TRAIN + ["cluster.num_workers=2", "parallel.pp=2", "logger.progress_bar=false"])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "done: 3 steps" in res.stdout
    topo = json.loads((run / "topology.json").read_text())
    assert [r["groups"]["pp"] for r in topo["ranks"]] == [[0, 1], [0, 1]]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["losses"]) == 3
    last = rows(run)[-1]
    assert all(f"moe/overload_factor/layer_{i}" in last for i in (1, 2, 3))
