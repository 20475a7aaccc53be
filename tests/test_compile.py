"""train.compile: the dense parts under torch.compile train like eager, step by step (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from launcher.config import ConfigError
from tests.conftest import job_from

RTOL = 1e-5


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_compiled_training_matches_eager(tiny_job, tmp_path, attention):
    from torch._dynamo.utils import counters

    from moe.train.loop import train

    tiny_job.model.attention = attention
    tiny_job.train.steps = 3
    tiny_job.run_dir = str(tmp_path / "eager")
    eager = train(tiny_job)
    tiny_job.train.compile = True
    tiny_job.run_dir = str(tmp_path / "compiled")
    torch._dynamo.reset()
    counters.clear()
    compiled = train(tiny_job)
    graphs = counters["stats"]["unique_graphs"]
    # Norm, attention and SwiGLU: one graph each, shared by all blocks (Dynamo inlines the modules),
    # plus a few more variants; far fewer than one per compiled module (4 layers x 4, and the final norm).
    assert 3 <= graphs <= 8, f"{graphs} compiled graphs"
    for key in ("losses", "grad_norms"):
        worst = max(rel(a, b) for a, b in zip(compiled[key], eager[key]))
        print(f"{attention} {key}: max relative difference {worst:.2e} ({graphs} graphs)")
        assert worst <= RTOL, (key, compiled[key], eager[key])


def test_compile_refused_with_tp_or_pp():
    with pytest.raises(ConfigError, match=r"train.compile=true: not supported with parallel.tp=2, parallel.pp=1"):
        job_from(["train.compile=true", "parallel.tp=2", "parallel.dp=1", "cluster.num_workers=2"])
