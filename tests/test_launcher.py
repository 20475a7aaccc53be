"""The Ray driver end to end: simulated two-node cluster, fail-fast preflight, worker errors, Ctrl-C,
a local Ray bound to loopback, and a real multi-process cluster from `ray start`.

One simulated cluster (`ray.cluster_utils.Cluster`, two nodes of 2 CPUs) serves the whole module; every
run goes through `python -m launcher` in a subprocess, as a user would start it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launcher.placement import worker_env

pytestmark = pytest.mark.slow

TRAIN = ["model=deepseek_tiny", "cluster.use_gpu=false", "cluster.cpus_per_worker=1", "data=synthetic",
         "logger.wandb.mode=disabled", "train.steps=3", "train.global_batch_size=8", "train.micro_batch_size=2",
         "train.seq_len=32", "train.eval_every=0", "train.warmup_steps=1"]
FOUR = ["cluster.num_workers=4", "parallel.dp=4", "parallel.ep=2"]


def launch(run_dir: Path, overrides: list[str], timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=run_dir.parent, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def free_cpus(address: str) -> float:
    """CPUs not held by anyone (the workers of a finished run must have released theirs)."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.time() + 20
        while (cpus := ray.available_resources().get("CPU", 0)) < ray.cluster_resources().get("CPU", 0):
            if time.time() > deadline:
                break
            time.sleep(0.5)
        return cpus
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def two_nodes():
    """Two simulated Ray nodes of 2 CPUs each on this machine (same IP, different node ids)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def check_topology(run_dir: Path, nodes: int, per_node: int, ep: int) -> dict:
    topo = json.loads((run_dir / "topology.json").read_text())
    ranks = topo["ranks"]
    assert [r["node_index"] for r in ranks] == [i // per_node for i in range(nodes * per_node)]
    node_ids = [r["node_id"] for r in ranks]
    assert len(set(node_ids)) == nodes
    for r in ranks:
        assert set(r["groups"]) == {"dp", "tp", "pp", "ep", "edp"}
        assert len(r["groups"]["ep"]) == ep
        assert len({node_ids[m] for m in r["groups"]["ep"]}) == 1, f"EP group {r['groups']['ep']} spans nodes"
        assert r["node_ip"] and r["gpu_id"] == "-"
    return topo


def test_simulated_two_nodes_trains_with_ep_inside_each_node(two_nodes, tmp_path):
    run = tmp_path / "run"
    res = launch(run, TRAIN + FOUR + [f"cluster.address={two_nodes}"])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "done: 3 steps" in res.stdout
    topo = check_topology(run, nodes=2, per_node=2, ep=2)
    assert [r["groups"]["ep"] for r in topo["ranks"]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert len({r["node_ip"] for r in topo["ranks"]}) == 1  # simulated nodes share an IP: ids told them apart
    assert "[0,1]@n0" in res.stderr and "[2,3]@n1" in res.stderr  # the printed table
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 4 and len(summary["losses"]) == 3


def test_simulated_two_nodes_keeps_tp_and_ep_groups_inside_nodes(two_nodes, tmp_path):
    """tp=2 x ep=2 (dp=2) on 2 nodes x 2 workers: every TP and EP group is one node's two ranks."""
    run = tmp_path / "run"
    res = launch(run, TRAIN + ["cluster.num_workers=4", "parallel.dp=2", "parallel.tp=2", "parallel.ep=2",
                               "logger.progress_bar=false", f"cluster.address={two_nodes}"])
    assert res.returncode == 0, res.stderr[-4000:]
    topo = check_topology(run, nodes=2, per_node=2, ep=2)
    node_ids = [r["node_id"] for r in topo["ranks"]]
    assert [r["groups"]["tp"] for r in topo["ranks"]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(len({node_ids[m] for m in r["groups"]["tp"]}) == 1 for r in topo["ranks"])
    assert [r["groups"]["dp"] for r in topo["ranks"]] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # dp crosses nodes
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 4 and len(summary["losses"]) == 3


def test_simulated_two_nodes_trains_tp_with_pp(two_nodes, tmp_path):
    """pp=2 x tp=2 on 2 nodes x 2 workers: each TP group is one node's two ranks, and the pipeline joins the
    same tp rank of both stages across the nodes (TP on the fast links, only PP's send/recv between nodes)."""
    run = tmp_path / "run"
    res = launch(run, TRAIN + ["cluster.num_workers=4", "parallel.tp=2", "parallel.pp=2",
                               "logger.progress_bar=false", f"cluster.address={two_nodes}"])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "done: 3 steps" in res.stdout
    topo = check_topology(run, nodes=2, per_node=2, ep=1)
    assert [r["groups"]["tp"] for r in topo["ranks"]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["groups"]["pp"] for r in topo["ranks"]] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 4 and len(summary["losses"]) == 3
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(f"moe/overload_factor/layer_{i}" in last for i in (1, 2, 3))  # both stages' layers logged


def test_more_workers_than_exist_fails_fast(two_nodes, tmp_path):
    started = time.time()
    res = launch(tmp_path / "run", TRAIN + ["cluster.num_workers=8", "parallel.dp=8", "parallel.ep=2",
                                            "train.global_batch_size=16",
                                            f"cluster.address={two_nodes}"], timeout=60)
    elapsed = time.time() - started
    assert res.returncode == 1, res.stderr[-3000:]
    assert "cluster.num_workers=8" in res.stderr and "2 node(s), 4 worker slots" in res.stderr
    assert "2 CPU, 0 GPU -> 2 CPU workers" in res.stderr
    assert elapsed < 10, f"the refusal took {elapsed:.1f} s (Python start and Ray connect included)"


def test_cross_node_ep_refused_on_the_cluster(two_nodes, tmp_path):
    res = launch(tmp_path / "run", TRAIN + ["cluster.num_workers=4", "parallel.dp=4", "parallel.ep=4",
                                            f"cluster.address={two_nodes}"], timeout=60)
    assert res.returncode == 1 and "allow_cross_node_ep=true" in res.stderr, res.stderr[-3000:]


def test_worker_error_stops_everyone_and_names_the_rank(two_nodes, tmp_path):
    res = launch(tmp_path / "run", TRAIN + FOUR + ["data.source=file", "data.path=/nonexistent/tokens.bin",
                                                   f"cluster.address={two_nodes}"])
    assert res.returncode == 1, res.stderr[-3000:]
    assert "error: worker rank" in res.stderr and "all workers stopped" in res.stderr
    assert "/nonexistent/tokens.bin" in res.stderr  # the worker's own error, passed through
    assert free_cpus(two_nodes) == 4  # no worker left holding its CPU


# Starts the launcher with SIGINT ignored and blocked, as a script's background job (or a parent that
# blocked it) would; both survive exec. The launcher must still stop on Ctrl-C. Before it reset
# SIGINT such a run trained on; a full local test session once hit that, with the launcher still in
# ray.wait a minute after the signal.
_SIGINT_OFF = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
               "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}); "
               "os.execv(sys.executable, [sys.executable, '-m', 'launcher', *sys.argv[1:]])")


def test_ctrl_c_stops_the_workers(two_nodes, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", _SIGINT_OFF, *TRAIN, *FOUR, "train.steps=100000", f"cluster.address={two_nodes}",
           f"hydra.run.dir={run}"]
    # faulthandler: if the launcher does not stop, SIGABRT makes it print every thread's stack.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists():  # training has started
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-3000:] if proc.poll() else ""
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"the launcher did not stop within 60 s of Ctrl-C; its output and stacks:\n{err[-8000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    assert free_cpus(two_nodes) == 4


def test_worker_env_through_runtime_env(two_nodes, monkeypatch):
    """Workers see NCCL_* / WANDB_* / MOE_TRITON_* from the driver, never WANDB_API_KEY or the driver's
    CUDA_VISIBLE_DEVICES."""
    import ray

    from launcher.placement import WorkerGroup
    from launcher.preflight import choose_nodes, read_cluster
    from launcher.topology import Layout

    env = {"NCCL_DEBUG": "INFO", "WANDB_PROJECT": "p", "WANDB_API_KEY": "secret", "CUDA_VISIBLE_DEVICES": "3",
           "MOE_TRITON_SCATTER": "combine"}
    assert worker_env(env) == {"NCCL_DEBUG": "INFO", "WANDB_PROJECT": "p", "NCCL_NVLS_ENABLE": "0",
                               "MOE_TRITON_SCATTER": "combine"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ray.init(address=two_nodes, logging_level="ERROR", log_to_driver=False)
    group = None
    try:
        plan = choose_nodes(read_cluster(False, 1), 4, 0, False, 1, Layout(dp=4, ep=2), False)
        group = WorkerGroup(plan, use_gpu=False, cpus_per_worker=1)
        started = group.describe()
        assert len({s.info.node_id for s in started}) == 2
        seen = ray.get(started[0].handle.__ray_call__.remote(
            lambda self: {k: os.environ.get(k) for k in ("NCCL_DEBUG", "WANDB_PROJECT", "WANDB_API_KEY",
                                                          "NCCL_NVLS_ENABLE", "MOE_TRITON_SCATTER")}))
        assert seen == {"NCCL_DEBUG": "INFO", "WANDB_PROJECT": "p", "WANDB_API_KEY": None, "NCCL_NVLS_ENABLE": "0",
                        "MOE_TRITON_SCATTER": "combine"}
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()


def test_local_ray_binds_to_loopback_and_trains(tmp_path):
    run = tmp_path / "run"
    res = launch(run, TRAIN + ["cluster.num_workers=2", "parallel.dp=2", "parallel.ep=2", "logger.progress_bar=false"])
    assert res.returncode == 0, res.stderr[-4000:]
    topo = check_topology(run, nodes=1, per_node=2, ep=2)
    assert {r["node_ip"] for r in topo["ranks"]} == {"127.0.0.1"}


def test_real_multiprocess_cluster_from_ray_start(tmp_path):
    """`ray start --head` plus a second `ray start --address`, joined through cluster.address. Both ask
    for token auth explicitly (Ray 2.60's default for `ray start` too); the driver joins in token mode
    when the user says so (RAY_AUTH_MODE=token), and explains the refusal when not."""
    port = free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, RAY_AUTH_MODE="token")
    common = ["--num-cpus=2", "--block", "--disable-usage-stats"]
    # A short temp dir: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    address_file = ray_tmp / "ray_current_cluster"
    head_log = open(tmp_path / "ray_head.log", "w")
    procs = []
    try:
        procs.append(subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                       f"--temp-dir={ray_tmp}", *common], start_new_session=True, env=env,
                                      stdout=head_log, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while not address_file.exists():
            assert time.time() < deadline and procs[0].poll() is None, \
                "ray start --head did not come up:\n" + (tmp_path / "ray_head.log").read_text()[-3000:]
            time.sleep(0.5)
        address = address_file.read_text().strip()
        procs.append(subprocess.Popen([ray_bin, "start", f"--address={address}", *common], start_new_session=True,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        waiter = subprocess.run([sys.executable, "-c", WAIT_FOR_TWO_NODES, address], env=env, timeout=90,
                                capture_output=True, text=True)
        assert waiter.returncode == 0, waiter.stderr[-2000:]
        # Without RAY_AUTH_MODE=token the driver sends no token: refused, with the fix in the message.
        no_auth = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        res = launch(tmp_path / "noauth", TRAIN + FOUR + [f"cluster.address={address}"], env=no_auth, timeout=120)
        assert res.returncode == 1 and "export RAY_AUTH_MODE=token" in res.stderr, res.stderr[-3000:]
        run = tmp_path / "run"
        res = launch(run, TRAIN + FOUR + [f"cluster.address={address}", "logger.progress_bar=false"], env=env)
        assert res.returncode == 0, res.stderr[-4000:]
        check_topology(run, nodes=2, per_node=2, ep=2)
    finally:
        # Stop only what this test started: each `ray start --block` leads its own process group and
        # takes its GCS, raylet and workers down with it on SIGTERM.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in reversed(procs):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(3)
        for p in procs:
            p.wait(timeout=30)
        head_log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


WAIT_FOR_TWO_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.time() + 60
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.time() < deadline, "the second node never joined"
    time.sleep(0.5)
"""
