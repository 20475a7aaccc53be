"""Single-process training: determinism, learning, outputs on disk, and the non-finite stop."""
from __future__ import annotations

import json
import os

import pytest
import torch

from moe.train.loop import NonFiniteError, train
from moe.train.optim import lr_at


def test_deterministic_and_learning(tiny_job, tmp_path):
    tiny_job.train.steps = 8
    a = train(tiny_job)
    tiny_job.run_dir = str(tmp_path / "again")
    b = train(tiny_job)
    assert [x.hex() for x in a["losses"]] == [x.hex() for x in b["losses"]]
    assert a["losses"][-1] < a["losses"][0]
    # ln(vocab) at initialisation: the weights start small, so the first loss is near uniform.
    assert abs(a["losses"][0] - torch.log(torch.tensor(4096.0)).item()) < 0.1


def test_deterministic_mode_on_during_training_only(tiny_job, tmp_path, monkeypatch):
    """train.deterministic turns PyTorch's deterministic algorithms on for the loop and puts the process's
    settings back after it. On CPU the losses equal those of a default run bit for bit: every op has a
    deterministic form and none reads a buffer it did not write (PyTorch fills new ones with NaN)."""
    import moe.train.loop as loop

    tiny_job.train.steps = 3
    plain = train(tiny_job)
    seen = []
    real = loop.forward_backward
    monkeypatch.setattr(loop, "forward_backward", lambda *a: seen.append(
        (torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))) or real(*a))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    tiny_job.train.deterministic = True
    tiny_job.run_dir = str(tmp_path / "deterministic")
    det = train(tiny_job)
    assert seen == [(True, ":4096:8")] * 3
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert [x.hex() for x in det["losses"]] == [x.hex() for x in plain["losses"]]


def test_writes_metrics_and_summary(tiny_job, tmp_path):
    summary = train(tiny_job)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(tiny_job.train.steps))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "moe/overload_factor"):
        assert key in rows[0], key
    assert rows[-1]["loss"] == summary["last_loss"]
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert on_disk["last_loss"] == summary["last_loss"] and on_disk["steps"] == tiny_job.train.steps


def test_nonfinite_loss_stops_before_update(tiny_job, monkeypatch):
    import moe.train.loop as loop

    real = loop.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] > 2 * 2 else loss  # step 2's first micro-batch (accum=2)

    monkeypatch.setattr(loop, "lm_loss", poisoned)
    with pytest.raises(NonFiniteError, match=r"non-finite training signal at step 2: loss=nan"):
        train(tiny_job)


def test_lr_schedule_warmup_and_cosine(tiny_job):
    t = tiny_job.train
    t.steps, t.warmup_steps, t.lr, t.min_lr_ratio = 10, 2, 1.0, 0.1
    assert lr_at(0, t) == pytest.approx(0.5)
    assert lr_at(1, t) == pytest.approx(1.0)
    assert lr_at(2, t) == pytest.approx(1.0)
    assert lr_at(6, t) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lr_at(10, t) == pytest.approx(0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU kernels are where runs stop repeating")
def test_deterministic_runs_repeat_bitwise_on_gpu(tiny_job, tmp_path, monkeypatch):
    """On a GPU, bf16: two train.deterministic runs give the same loss and gradient norm bits at every
    step, through the Triton experts' combine and the padded flash attention (MLA's head sizes differ)."""
    import moe.kernels.grouped_swiglu as gs
    import moe.model.attention as attention

    used = {"combine": 0, "padded": 0}

    def counted(key: str, fn):
        def call(*args):
            used[key] += 1
            return fn(*args)
        return call

    monkeypatch.setattr(gs, "segment_sum", counted("combine", gs.segment_sum))
    monkeypatch.setattr(attention, "attention_one_head_size", counted("padded", attention.attention_one_head_size))
    t = tiny_job.train
    t.steps, t.seq_len, t.global_batch_size, t.micro_batch_size, t.deterministic = 6, 256, 8, 4, True
    tiny_job.cluster.use_gpu = True
    tiny_job.model.moe.backend = "triton"
    runs = []
    for name in ("a", "b"):
        tiny_job.run_dir = str(tmp_path / name)
        s = train(tiny_job)
        runs.append([(x.hex(), y.hex()) for x, y in zip(s["losses"], s["grad_norms"])])
    assert runs[0] == runs[1]
    assert used["combine"] > 0 and used["padded"] > 0, used
