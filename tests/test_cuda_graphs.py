"""train.cuda_graphs: a micro-batch captured once and replayed trains like eager, step by step.

The comparisons need a GPU (they run in the device checks, benchmarks/graph_gpu_checks.sh); on CPU
the configuration check and the refusals run.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from launcher.config import ConfigError
from tests.conftest import job_from
from tests.test_expert_parallel import rel

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def gpu_job(tmp_path, name: str, graphs: bool, extra: list[str] = ()):
    job = job_from([
        "model=deepseek_tiny", "data=synthetic", "cluster.use_gpu=true", "logger.wandb.mode=disabled",
        "logger.progress_bar=false", "logger.plot_every=0", "train.steps=6", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.seq_len=64", "train.eval_every=3", "train.eval_batches=2",
        "train.warmup_steps=1", f"train.cuda_graphs={str(graphs).lower()}", *extra,
    ])
    job.run_dir = str(tmp_path / name)
    return job


def worst(a: dict, b: dict) -> float:
    return max(rel(x, y) for key in ("losses", "grad_norms") for x, y in zip(a[key], b[key]))


@cuda_only
def test_graphed_training_matches_eager(tmp_path):
    """Deterministic mode (fixed-order sums), 4 micro-batches per step, an evaluation between replays:
    the graph's losses and gradient norms equal eager's to 1e-6, and its router metrics are logged."""
    from moe.train.loop import train

    extra = ["train.deterministic=true"]
    eager = train(gpu_job(tmp_path, "eager", False, extra))
    graphed = train(gpu_job(tmp_path, "graphed", True, extra))
    diff = worst(graphed, eager)
    print(f"graphs vs eager, deterministic: largest relative difference {diff:.2e}")
    assert diff <= 1e-6, (graphed["losses"], eager["losses"])
    rows, eager_rows = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                        for run in ("graphed", "eager"))
    router_keys = [k for k in eager_rows[0] if k.startswith("moe/") and "/layer_" in k and "wait" not in k]
    assert len(router_keys) >= 4, router_keys
    for r, e in zip(rows, eager_rows):
        for key in router_keys:
            assert rel(r[key], e[key]) <= 1e-5, (r["step"], key, r[key], e[key])
    # The expert regions time themselves inside the graph (DeviceClockTimer): every step reports a
    # positive time, below the step's, and step 0 does not include the two eager warm-up micro-batches.
    times = [r["perf/expert_compute_time_s"] for r in rows]
    eager_times = [r["perf/expert_compute_time_s"] for r in eager_rows]
    print(f"expert region per step, s: graphed {times}, eager {eager_times}")
    assert all(0 < t < r["step_time_s"] for t, r in zip(times, rows)), times
    later = sorted(times[1:])[len(times[1:]) // 2]
    assert times[0] < 3 * later, times


@cuda_only
def test_graphed_training_default_mode_close_to_eager(tmp_path):
    """The default (atomic scatter-adds, not reproducible bit for bit): within bf16 rounding of eager."""
    from moe.train.loop import train

    eager = train(gpu_job(tmp_path, "eager", False))
    graphed = train(gpu_job(tmp_path, "graphed", True))
    diff = worst(graphed, eager)
    print(f"graphs vs eager, default mode: largest relative difference {diff:.2e}")
    assert diff <= 2e-2, (graphed["losses"], eager["losses"])
    assert graphed["losses"][-1] < graphed["losses"][0]


@cuda_only
def test_negative_control_stale_batch_is_caught(tmp_path, monkeypatch):
    """A graph that replays without loading the new micro-batch trains on the captured one only: the
    comparison above must fail on it."""
    from moe.train import cuda_graph
    from moe.train.loop import train

    extra = ["train.deterministic=true"]
    eager = train(gpu_job(tmp_path, "eager", False, extra))
    real_load = cuda_graph.GraphedMicroStep._load

    def load_once(self, inputs, targets):
        if self.graph is None:  # the capture's batch only
            real_load(self, inputs, targets)

    monkeypatch.setattr(cuda_graph.GraphedMicroStep, "_load", load_once)
    stale = train(gpu_job(tmp_path, "stale", True, extra))
    assert worst(stale, eager) > 1e-3


@cuda_only
def test_capture_failure_names_the_cause():
    """In a subprocess: a failed capture leaves PyTorch's CUDA generator in capture mode for the rest of
    its process (the next torch.randn on the GPU raises), which would break the tests after this one."""
    code = """
import torch
from moe.train.cuda_graph import GraphedMicroStep

model = torch.nn.Linear(8, 8).cuda()

def syncing_step(x, y):
    loss = (model(x) - y).square().mean()
    loss.backward()
    if loss.item() > 1e9:  # a host sync: not allowed while capturing
        pass
    return loss.detach(), loss.detach(), {}

GraphedMicroStep(model, syncing_step, torch.device("cuda"))(torch.ones(4, 8).cuda(), torch.zeros(4, 8).cuda())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "CudaGraphCaptureError: train.cuda_graphs: capturing the micro-batch failed" in res.stderr, \
        res.stderr[-3000:]


def test_refused_without_gpu():
    with pytest.raises(ConfigError, match=r"train.cuda_graphs=true: needs a GPU \(cluster.use_gpu=false\)"):
        job_from(["train.cuda_graphs=true"])


@pytest.mark.parametrize("overrides, message", [
    (["parallel.ep=2", "parallel.dp=2", "cluster.num_workers=2"], r"one GPU only for now \(parallel.dp=2, parallel.ep=2\)"),
    (["model.moe.router.capacity_factor=1.25"], r"capacity_factor=1.25: capacity drops select the kept rows on the host"),
    (["model.moe.backend=torch"], r"model.moe.backend=torch: its per-expert loop reads the counts on the host"),
])
def test_refused_where_the_step_syncs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        job_from(["train.cuda_graphs=true", "cluster.use_gpu=true", *overrides])


@cuda_only
def test_device_clock_timer_matches_events_and_sums_replays():
    """The clock marks time a region like CUDA events do, eagerly; captured in a graph, every replay adds
    its duration (events recorded in a capture would time nothing)."""
    from moe.train.timing import DeviceClockTimer, RegionTimer, run_timed

    dev = torch.device("cuda")
    w = torch.randn(4096, 4096, device=dev)
    x = torch.randn(4096, 4096, device=dev, requires_grad=True)

    def fwd_bwd(timer):
        y = run_timed(timer, "r", x, lambda t: (t @ w) @ w)
        y.sum().backward()

    for _ in range(2):  # cuBLAS and the mark kernel's compile out of the way
        fwd_bwd(DeviceClockTimer(dev))
    events, clock = RegionTimer(dev), DeviceClockTimer(dev)
    fwd_bwd(events)
    fwd_bwd(clock)
    torch.cuda.synchronize()
    (ev_f, ev_b), (ck_f, ck_b) = events.collect()["r"], clock.collect()["r"]
    print(f"events fwd {ev_f:.2e} bwd {ev_b:.2e}; clock fwd {ck_f:.2e} bwd {ck_b:.2e} s")
    assert 0.7 < ck_f / ev_f < 1.4 and 0.7 < ck_b / ev_b < 1.4

    graphed = DeviceClockTimer(dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fwd_bwd(graphed)  # warm-up, then zeroed
    torch.cuda.current_stream().wait_stream(side)
    graphed.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fwd_bwd(graphed)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    g_f, g_b = graphed.collect()["r"]
    assert 0.7 < g_f / (3 * ck_f) < 1.4 and 0.7 < g_b / (3 * ck_b) < 1.4, (g_f, g_b, ck_f, ck_b)


def test_warm_up_leaves_no_trace(tiny_job):
    """The capture's warm-up micro-batches (here on CPU, the real model and micro-step) leave gradients
    and expert-load counters as they found them, except that absent gradients become zeros."""
    from moe.model.transformer import build_model
    from moe.train.cuda_graph import warm_up_leaving_no_trace
    from moe.train.loop import micro_step_fn

    torch.manual_seed(0)
    model = build_model(tiny_job.model, 0, torch.device("cpu"))
    step = micro_step_fn(model, tiny_job, torch.device("cpu"), accum=2)
    batch = torch.randint(0, tiny_job.model.vocab_size, (2, 16))
    loads = [m.tokens_per_expert_acc for m in model.moe_layers().values()]

    warm_up_leaving_no_trace(model, lambda: step(batch, batch), times=2)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and not g.any() for g in grads.values())
    assert not any(load.any() for load in loads)

    step(batch, batch)  # a real micro-batch: the state the next warm-up must give back
    after_one = {n: p.grad.clone() for n, p in model.named_parameters()}
    loads_one = [load.clone() for load in loads]
    assert all(load.sum() > 0 for load in loads_one)  # the run does add to the counters
    warm_up_leaving_no_trace(model, lambda: step(batch, batch), times=2)
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and torch.equal(p.grad, after_one[n]), n  # same tensors, same values
    assert all(torch.equal(a, b) for a, b in zip(loads, loads_one))


def test_forward_backward_reads_outputs_before_the_next_replay(tiny_job):
    """A graph returns the same output tensors from every replay, rewritten in place: the step's sums
    must take each micro-batch's values before the next call overwrites them."""
    from moe.data import build_dataset
    from moe.train.loop import forward_backward

    ce, aux, metric = torch.zeros(()), torch.zeros(()), torch.zeros(())
    calls = []

    def static_outputs(inputs, targets):  # like a replay: same tensors, new values
        calls.append(1)
        ce.fill_(float(len(calls)))
        aux.fill_(10.0 * len(calls))
        metric.fill_(10.0 ** len(calls))  # 10, 100, 1000: a sum that kept a reference would read otherwise
        return ce, aux, {"moe/x/layer_1": metric}

    dataset = build_dataset(tiny_job.data, tiny_job.train.seq_len, 0, tiny_job.model.vocab_size)
    ce_sum, aux_sum, sums = forward_backward(static_outputs, dataset, tiny_job, torch.device("cpu"), 0, 0, 3)
    assert (ce_sum.item(), aux_sum.item(), sums["moe/x/layer_1"].item()) == (6.0, 60.0, 1110.0)


def test_device_clock_timer_refuses_cpu():
    from moe.train.timing import DeviceClockTimer

    with pytest.raises(ValueError, match="reads a CUDA device's clock"):
        DeviceClockTimer(torch.device("cpu"))


def test_replay_refuses_a_micro_batch_of_another_shape():
    """A smaller batch would broadcast into the captured buffers without a word: it is refused."""
    from moe.train.cuda_graph import GraphedMicroStep

    step = GraphedMicroStep.__new__(GraphedMicroStep)  # as after a capture, without a GPU
    step.graph, step.inputs, step.targets = object(), torch.zeros(4, 16), torch.zeros(4, 16)
    with pytest.raises(ValueError, match=r"micro-batch of shape \(1, 16\) after capturing \(4, 16\)"):
        step(torch.zeros(1, 16), torch.zeros(1, 16))


def test_graph_wrapper_refuses_cpu():
    from moe.train.cuda_graph import GraphedMicroStep

    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedMicroStep(torch.nn.Linear(2, 2), lambda x, y: (x, y, {}), torch.device("cpu"))
