"""Checkpoints: atomic, verified, bit-identical resume, and loading under another layout."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from moe.train import checkpoint
from moe.train.loop import train
from tests.dist_utils import run_distributed, spawn
from tests.test_expert_parallel import make_job, rel


def _job(run_dir, steps=10, **kw):
    job = make_job(run_dir, steps=steps, extra=["train.checkpoint_every=5", "train.keep_checkpoints=5"], **kw)
    return job


def _hex(xs):
    return [x.hex() for x in xs]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    return run_dir, train(_job(run_dir))


def _seed_from(full_dir, step, new_dir):
    src = os.path.join(full_dir, "checkpoints", f"step_{step:08d}")
    shutil.copytree(src, os.path.join(new_dir, "checkpoints", f"step_{step:08d}"))


def test_checkpoints_written_and_complete(full_run):
    run_dir, _ = full_run
    steps = [s for s, _ in checkpoint.complete_checkpoints(os.path.join(run_dir, "checkpoints"))]
    assert steps == [4, 9]
    for _, folder in checkpoint.complete_checkpoints(os.path.join(run_dir, "checkpoints")):
        assert checkpoint.verify(folder)["step"] in (4, 9)


def test_resume_is_bit_identical(full_run, tmp_path):
    run_dir, full = full_run
    _seed_from(run_dir, 4, tmp_path)
    resumed = train(_job(tmp_path))
    assert resumed["start_step"] == 5 and resumed["losses_from_step"] == 0
    # The summary covers all 10 steps: 0-4 from the checkpoint's history, 5-9 run again here.
    assert _hex(resumed["losses"]) == _hex(full["losses"])
    assert _hex(resumed["grad_norms"]) == _hex(full["grad_norms"])


def test_negative_control_without_optimizer_state_differs(full_run, tmp_path, monkeypatch):
    run_dir, full = full_run
    _seed_from(run_dir, 4, tmp_path)
    real = checkpoint._state_views

    def weights_only(*args, **kwargs):
        return {k: v for k, v in real(*args, **kwargs).items() if not k.startswith("optim.")}

    monkeypatch.setattr(checkpoint, "_state_views", weights_only)
    resumed = train(_job(tmp_path))
    assert _hex(resumed["losses"][5:6]) == _hex(full["losses"][5:6])  # same weights at the restart
    assert _hex(resumed["losses"][5:]) != _hex(full["losses"][5:])  # but not the same continuation


def test_incomplete_and_tampered_checkpoints_are_skipped(full_run, tmp_path, capsys):
    run_dir, full = full_run
    _seed_from(run_dir, 4, tmp_path)
    # A save that died before its manifest: the folder exists under a final name but is not complete.
    broken = tmp_path / "checkpoints" / "step_00000009"
    shutil.copytree(os.path.join(run_dir, "checkpoints", "step_00000009"), broken)
    os.remove(broken / "manifest.json")
    # A newer one whose data changed after it was written.
    tampered = tmp_path / "checkpoints" / "step_00000007"
    shutil.copytree(os.path.join(run_dir, "checkpoints", "step_00000009"), tampered)
    data_file = next(f for f in os.listdir(tampered) if f.endswith(".distcp"))
    with open(tampered / data_file, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    resumed = train(_job(tmp_path))
    assert resumed["start_step"] == 5
    assert "sha256 differs" in capsys.readouterr().out
    assert _hex(resumed["losses"]) == _hex(full["losses"])


def test_named_path_must_verify(tmp_path):
    bogus = tmp_path / "elsewhere"
    bogus.mkdir()
    job = _job(tmp_path / "run")
    job.train.resume = str(bogus)
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        train(job)


def test_ep2_checkpoint_loads_on_one_process(full_run, tmp_path):
    """Saved at ep=2 (world 2), loaded by one process: the same parameters as the one-process run's own
    checkpoint (up to the layouts' fp32 rounding), and the continuation matches it."""
    run_dir, full = full_run
    ep_dir = tmp_path / "ep2"
    run_distributed(_job(ep_dir, steps=10, dp=2, ep=2), world=2)  # same schedule as the reference
    ep_ckpt = os.path.join(ep_dir, "checkpoints", "step_00000004")
    ref_ckpt = os.path.join(run_dir, "checkpoints", "step_00000004")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ep_ckpt, tmp_path / "ep.pt")
    dcp_to_torch_save(ref_ckpt, tmp_path / "ref.pt")
    a = torch.load(tmp_path / "ep.pt", weights_only=True)
    b = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert sorted(a) == sorted(b)
    assert any(".experts.w_gate_EDF.expert_7" in k for k in a)
    # Two layouts trained 5 steps: equal up to fp32 rounding that Adam amplifies on rarely-seen rows.
    for k in a:
        if not k.startswith("optim."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-5, msg=k)

    # Loading the ep=2 checkpoint into one process reproduces exactly what was saved, expert by expert.
    from moe.model.transformer import build_model
    from moe.parallel.mesh import ParallelContext
    from moe.train.optim import build_optimizer

    job = _job(tmp_path / "load")
    model = build_model(job.model, seed=123)  # other weights: all must be overwritten
    optimizer = build_optimizer(model, job.train)
    checkpoint.load(ep_ckpt, model, optimizer, ParallelContext())
    for name, p in model.named_parameters():
        if ".experts." in name:
            for e in range(p.shape[0]):
                assert torch.equal(p[e], a[f"{name}.expert_{e}"]), (name, e)
                assert torch.equal(optimizer.state[p]["exp_avg"][e], a[f"optim.exp_avg.{name}.expert_{e}"])
        else:
            assert torch.equal(p, a[name]), name

    job = _job(tmp_path / "single")
    job.train.resume = ep_ckpt
    resumed = train(job)
    assert len(resumed["losses"]) == 10  # 0-4 from the ep=2 run's checkpoint history
    for x, y in zip(resumed["losses"][5:], full["losses"][5:]):
        assert rel(x, y) < 1e-5


def test_checkpoint_holds_data_position_history_and_expert_biases(full_run):
    run_dir, full = full_run
    folder = os.path.join(run_dir, "checkpoints", "step_00000004")
    extra = checkpoint.verify(folder)["extra"]
    assert extra["step"] == 4 and extra["data"]["next_batch"] == 5 and extra["wandb_run_id"] is None
    history = checkpoint.load_history(folder)
    assert _hex(history["losses"]) == _hex(full["losses"][:5]) and len(history["grad_norms"]) == 5
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(folder).read_metadata().state_dict_metadata
    moe_layers = [k for k in keys if k.endswith("router.expert_bias")]
    assert len(moe_layers) == 3  # deepseek_tiny: 4 layers, the first dense
    assert os.path.isfile(os.path.join(folder, "rng_rank0.pt"))


def _rng_and_bias_roundtrip(rank: int, world: int, root: str):
    """Each rank gives its RNG its own state and the routers random biases, saves, draws; then scrambles
    both, loads, and draws again: the draws and the biases must come back exactly, rank by rank."""
    from moe.config import ParallelConfig
    from moe.model.transformer import build_model
    from moe.parallel.mesh import build_parallel_context
    from moe.train.optim import build_optimizer

    job = _job(root)
    ctx = build_parallel_context(ParallelConfig(dp=world), "cpu")
    model = build_model(job.model, seed=0)
    optimizer = build_optimizer(model, job.train)
    for p in model.parameters():  # one (zero) step, so the optimizer has moments to save
        p.grad = torch.zeros_like(p)
    optimizer.step()
    biases = {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}
    for b in biases.values():  # replicated like in training: the same values on every rank
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(1000 + rank)
    saved = {n: b.clone() for n, b in biases.items()}
    folder = checkpoint.save(root, 0, model, optimizer, ctx, {"step": 0}, keep=1)
    expected = torch.rand(4)
    torch.manual_seed(7)
    for b in biases.values():
        b.zero_()
    checkpoint.load(folder, model, optimizer, ctx)
    assert all(torch.equal(biases[n], saved[n]) for n in saved)
    return expected.tolist(), torch.rand(4).tolist()


def test_every_rank_restores_its_own_rng_and_the_expert_biases(tmp_path):
    results = spawn(_rng_and_bias_roundtrip, 2, str(tmp_path))
    (want0, got0), (want1, got1) = results
    assert got0 == want0 and got1 == want1
    assert want0 != want1  # two ranks, two different streams: each got its own back
    assert sorted(f for f in os.listdir(tmp_path / "step_00000000") if f.startswith("rng")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]


def test_resumed_run_keeps_logging_into_the_same_wandb_run(tmp_path):
    first = _job(tmp_path, steps=5)
    first.logger.wandb.mode = "offline"
    train(first)
    run_id = checkpoint.verify(str(tmp_path / "checkpoints" / "step_00000004"))["extra"]["wandb_run_id"]
    assert run_id
    second = _job(tmp_path, steps=7)
    second.logger.wandb.mode = "offline"
    resumed = train(second)
    assert resumed["start_step"] == 5 and len(resumed["losses"]) == 7
    runs = sorted(os.listdir(tmp_path / "wandb"))
    assert len([r for r in runs if r.startswith("offline-run-") and r.endswith(run_id)]) == 2, runs
