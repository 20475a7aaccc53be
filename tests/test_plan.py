"""Plan mode: the seed documents' DeepSeek-V3 worked example, memory arithmetic, refusals."""
from __future__ import annotations

import subprocess
import sys

import pytest

from launcher.plan import memory_plan, print_plan, traffic_plan
from launcher.topology import Layout, assumed_placements
from moe.model.params import count_params_from_config
from tests.conftest import job_from

# DeepSeek-V3: 256 experts one per GPU (ep=256 over 32 nodes of 8), top-8, 4096 tokens per GPU.
V3 = ["model=deepseek_v3", "cluster.use_gpu=true", "cluster.num_workers=256", "cluster.workers_per_node=8",
      "parallel.dp=256", "parallel.ep=256", "train.micro_batch_size=1", "train.seq_len=4096",
      "train.global_batch_size=256"]


def test_worked_example_numbers():
    job = job_from(V3 + ["parallel.allow_cross_node_ep=true"])
    m = job.model
    assert (m.hidden_size, m.moe.top_k, m.moe.num_experts, m.num_layers - m.num_dense_layers) == (7168, 8, 256, 58)
    placements = assumed_placements(Layout(dp=256, ep=256), 8, use_gpu=True)
    tr = traffic_plan(4096, 8, 7168, 2, 58, 1, placements)
    assert tr.vectors_per_layer == 32_640
    assert tr.bytes_per_vector == 14_336
    assert tr.dispatch_bytes == 32_640 * 14_336 == pytest.approx(468e6, rel=1e-3)
    assert tr.forward_bytes == pytest.approx(54.28e9, rel=1e-3)  # dispatch + combine over 58 layers
    # Uniform routing: 7 of the 255 peers share the node, 248 are on other nodes.
    assert tr.intra_node_bytes == pytest.approx(tr.dispatch_bytes * 7 / 255)
    assert tr.inter_node_bytes == pytest.approx(tr.dispatch_bytes * 248 / 255)
    assert tr.step_bytes == 2 * tr.forward_bytes


def test_worked_example_printed(capsys):
    assert print_plan(job_from(V3 + ["parallel.allow_cross_node_ep=true"])) == []
    out = capsys.readouterr().out
    assert "32,640 token vectors = 467.9 MB dispatch" in out
    assert "54.28 GB per forward pass" in out
    assert "[0-255]@32 nodes" in out  # the EP group column of the table
    assert "REFUSED" not in out
    assert "transport (parallel.ep_comm): nccl" in out


def test_plan_names_the_p2p_transport(capsys):
    job = job_from(["model=deepseek_tiny", "cluster.use_gpu=true", "cluster.num_workers=2", "parallel.dp=2",
                    "parallel.ep=2", "parallel.ep_comm=p2p"])
    assert print_plan(job) == []
    assert "transport (parallel.ep_comm): p2p" in capsys.readouterr().out


def test_worked_example_refused_without_cross_node_ep(capsys):
    problems = print_plan(job_from(V3))
    out = capsys.readouterr().out
    assert problems and "REFUSED" in out and "parallel.allow_cross_node_ep=true" in out
    assert "EP group of 256 ranks needs 32 of the 32 nodes" in out


def test_node_local_ep_has_no_inter_node_traffic():
    placements = assumed_placements(Layout(dp=16, ep=8), 8, use_gpu=True)
    tr = traffic_plan(4096, 8, 7168, 2, 58, 2, placements)
    assert tr.inter_node_bytes == 0 and tr.intra_node_bytes == pytest.approx(tr.dispatch_bytes)
    assert tr.step_bytes == 4 * tr.forward_bytes  # forward + backward, two micro-batches


def test_memory_per_gpu_splits_dense_and_experts():
    job = job_from(["model=deepseek_tiny", "cluster.num_workers=4", "parallel.dp=4", "parallel.ep=2",
                    "train.global_batch_size=16", "train.micro_batch_size=4"])
    counts = count_params_from_config(job.model)
    mem = memory_plan(job, tokens=512, act_bytes=4)
    assert mem.params == (counts.total - counts.routed_experts) + counts.routed_experts / 2
    assert (mem.weights, mem.grads, mem.optimizer) == (4 * mem.params, 4 * mem.params, 8 * mem.params)
    assert mem.activations > 0 and mem.total > mem.weights + mem.grads + mem.optimizer


def test_plan_mode_command_line_exit_codes(tmp_path):
    base = [sys.executable, "-m", "launcher", "launcher.mode=plan", f"hydra.run.dir={tmp_path}"]
    ok = subprocess.run(base + ["cluster.num_workers=4", "parallel.dp=4", "parallel.ep=2",
                                "cluster.workers_per_node=2", "train.global_batch_size=32"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "[0,1]@n0" in ok.stdout and "[2,3]@n1" in ok.stdout
    bad = subprocess.run(base + ["cluster.num_workers=4", "parallel.dp=4", "parallel.ep=4",
                                 "cluster.workers_per_node=2", "train.global_batch_size=32"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "REFUSED" in bad.stdout and "allow_cross_node_ep" in bad.stdout


def test_tp_with_pp_is_planned(capsys):
    """pp=2 x tp=2 x ep=2 on 4 workers: accepted; the pipeline line names the tp split of each stage and the
    [mbs, S/tp, D] slice each rank sends; the all-to-all counts each tp rank's own 1/tp of the tokens."""
    job = job_from(["model=deepseek_tiny", "cluster.num_workers=4", "parallel.tp=2", "parallel.pp=2",
                    "parallel.ep=2", "train.global_batch_size=16", "train.micro_batch_size=8", "train.seq_len=128"])
    assert print_plan(job) == []
    out = capsys.readouterr().out
    assert "REFUSED" not in out
    assert "every stage sharded over its own tp=2 ranks" in out
    assert f"each rank sends [8, 128/2, 128] fp32 = {8 * 64 * 128 * 4 / 1e6:,.2f} MB to the next stage" in out
    assert "uniform routing, 512 tokens" in out  # 8 x 128 tokens per micro-batch, half on each tp rank
    placements = assumed_placements(Layout(dp=1, tp=2, pp=2, ep=2), 4, use_gpu=False)
    assert [p.groups["pp"] for p in placements] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # same tp rank per stage
    assert [p.groups["tp"] for p in placements] == [[0, 1], [0, 1], [2, 3], [2, 3]]
