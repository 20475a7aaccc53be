"""train.compile: the dense parts under torch.compile train like eager, step by step (fp32, CPU), in one
process and with expert parallelism (the compiled shared experts run while the dispatch is in flight)."""
from __future__ import annotations

import pytest
import torch

from launcher.config import ConfigError
from tests.conftest import job_from
from tests.dist_utils import run_distributed
from tests.test_expert_parallel import RTOL, assert_matches, make_job, reference, rel  # noqa: F401 (fixture)


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_compiled_training_matches_eager(tmp_path, attention):
    from torch._dynamo.utils import counters

    from moe.train.loop import train

    eager = train(make_job(tmp_path / "eager", steps=3, extra=[f"model.attention={attention}"]))
    torch._dynamo.reset()
    counters.clear()
    compiled = train(make_job(tmp_path / "compiled", steps=3, extra=[f"model.attention={attention}",
                                                                    "train.compile=true"]))
    graphs = counters["stats"]["unique_graphs"]
    # Norm, attention and SwiGLU: one graph each, shared by all blocks (Dynamo inlines the modules),
    # plus a few more variants; far fewer than one per compiled module (4 layers x 4, and the final norm).
    assert 3 <= graphs <= 8, f"{graphs} compiled graphs"
    for key in ("losses", "grad_norms"):
        worst = max(rel(a, b) for a, b in zip(compiled[key], eager[key]))
        print(f"{attention} {key}: max relative difference {worst:.2e} ({graphs} graphs)")
        assert worst <= RTOL, (key, compiled[key], eager[key])


def test_compiled_ep2_matches_single_process(tmp_path, reference):
    """dp=2 x ep=2, compiled, against the eager single-process run of tests/test_expert_parallel.py.
    Same micro-batch shapes as the test above, so the ranks mostly reuse its compiled kernels."""
    summaries = run_distributed(make_job(tmp_path, dp=2, ep=2, steps=3, extra=["train.compile=true"]), world=2)
    for rank, s in enumerate(summaries):
        assert len(s["losses"]) == 3
        assert_matches(s, reference, f"compiled dp=2 ep=2 rank {rank}")


def test_compile_refused_with_tp_or_pp():
    with pytest.raises(ConfigError, match=r"train.compile=true: not supported with parallel.tp=2, parallel.pp=1"):
        job_from(["train.compile=true", "parallel.tp=2", "parallel.dp=1", "cluster.num_workers=2"])


def test_compile_keeps_parameter_names():
    """Compiled in place: the names checkpoints are keyed by do not change (no `_orig_mod.` prefix)."""
    from moe.model.compile import apply_compile
    from moe.model.transformer import build_model

    model = build_model(job_from(["model=deepseek_tiny"]).model, 0)
    names = list(model.state_dict())
    compiled = apply_compile(model)
    assert len(compiled) == 4 * 4 + 1  # per block: two norms, attention, dense FFN or shared experts; final norm
    assert list(model.state_dict()) == names
