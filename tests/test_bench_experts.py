"""The expert benchmark's routings and its input checks (CPU; the timings themselves need a GPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The benchmark imports the kernels; they read this at import, and the kernel tests collected
    # after this file run under the interpreter.
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_experts import Shape, make_routing  # noqa: E402

SHAPE = Shape(E=12, D=16, F=8, T=30, k=4)


def _routing(skew: str):
    return make_routing(SHAPE, skew, torch.Generator().manual_seed(0), torch.device("cpu"))


@pytest.mark.parametrize("skew", ["uniform", "zipf", "balanced"])
def test_routing_is_a_valid_top_k(skew):
    row_idx_S, gate_S, counts_E = _routing(skew)
    assert int(counts_E.sum()) == SHAPE.T * SHAPE.k == row_idx_S.numel() == gate_S.numel()
    # Every token appears k times, and its k rows go to k distinct experts.
    assert torch.equal(torch.bincount(row_idx_S, minlength=SHAPE.T), torch.full((SHAPE.T,), SHAPE.k))
    expert_S = torch.repeat_interleave(torch.arange(SHAPE.E), counts_E)
    for t in range(SHAPE.T):
        assert expert_S[row_idx_S == t].unique().numel() == SHAPE.k


def test_balanced_routing_gives_every_expert_the_same_rows():
    _, _, counts_E = _routing("balanced")
    assert torch.equal(counts_E, torch.full((SHAPE.E,), SHAPE.T * SHAPE.k // SHAPE.E))
    _, _, uniform_E = _routing("uniform")
    assert not torch.equal(uniform_E, counts_E)  # the comparison the balanced routing is for


def test_unknown_routing_is_refused():
    with pytest.raises(ValueError, match=r"routing 'zipff' is not one of"):
        _routing("zipff")


@pytest.mark.parametrize("script, args, message", [
    ("bench_experts.py", ["--skews", "uniform,zipff"], "--skews: ['zipff'] not among"),
    ("bench_experts.py", ["--profile-skews", "bal"], "--profile-skews: ['bal'] not among"),
    ("bench_experts.py", ["--shapes", "qwen"], "--shapes: ['qwen'] not among"),
    ("bench_experts.py", ["--backends", "triton,tritn"], "--backends: ['tritn'] not among"),
    ("bench_experts.py", ["--rounds", "0"], "--rounds: 0 is not a positive number"),
    ("bench_experts.py", ["--mode", "pregrouped"], "invalid choice: 'pregrouped'"),
    ("bench_down_combine.py", ["--shapes", "qwen"], "--shapes: ['qwen'] not among"),
    ("bench_down_combine.py", ["--skews", "zipff"], "--skews: ['zipff'] not among"),
    ("bench_train_backends.py", ["--out", "/tmp/x", "--backends", "torch+graphs"], "--backends: ['torch+graphs'] not among"),
    ("bench_train_backends.py", ["--out", "/tmp/x", "--backends", "triton,triton+graphs", "--base", "grouped_mm"],
     "--base='grouped_mm': must be one of the runs in --backends (triton, triton+graphs)"),
])
def test_bad_arguments_fail_before_any_gpu_work(script, args, message):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2
    assert message in r.stderr


def test_train_bench_names_the_first_differing_step():
    """bench_train_backends' reproducibility line: bitwise equal runs, and the first step where a loss or
    a gradient norm differs in any bit."""
    from bench_train_backends import first_difference, reproducibility

    a = {"losses": [3.0, 2.0, 1.0], "grad_norms": [1.0, 1.0, 1.0]}
    norm_differs = {"losses": [3.0, 2.0, 1.0], "grad_norms": [1.0, 1.0 + 2**-40, 1.0]}
    loss_differs = {"losses": [3.0, 2.0, 1.5], "grad_norms": [1.0, 1.0, 1.0]}
    assert first_difference(a, dict(a)) is None
    assert first_difference(a, norm_differs) == 1
    assert reproducibility([a, dict(a)]) == "loss and grad_norm bitwise equal at all 3 steps"
    assert reproducibility([a, loss_differs, norm_differs]) == (
        "first step where loss or grad_norm differ: 1; largest relative loss difference 5.0e-01")
