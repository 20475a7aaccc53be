"""Worker failures through the real launcher (local Ray, 2 CPU workers, dp=2 x ep=2, gloo): a worker
killed mid-step or mid-checkpoint is replaced and the run continues bit-identically from the last
complete checkpoint; a worker killed on every attempt ends in a clear error after train.max_failures
restarts; a worker stopped inside the expert all-to-all is reported with its group and collective;
the launcher started again on the same run dir continues from its last checkpoint.

Faults come from the test-only hook moe.train.faults (MOE_TEST_FAULT). Losses and gradient norms are
compared as float.hex: equal bits, not close values.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 20
TRAIN = ["model=deepseek_tiny", "cluster.use_gpu=false", "cluster.cpus_per_worker=1", "data=synthetic",
         "logger.wandb.mode=disabled", "logger.progress_bar=false", f"train.steps={STEPS}",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_len=32", "train.eval_every=0",
         "train.warmup_steps=1", "train.checkpoint_every=5", "train.keep_checkpoints=5", "logger.plot_every=0",
         "cluster.num_workers=2", "parallel.dp=2", "parallel.ep=2"]
KILL_AT_7 = "kill:rank=1:step=7:where=before_optimizer"


def launch(run_dir: Path, overrides: list[str], fault: str | None = None, skip_restore: str | None = None,
           timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_TEST_")}
    if fault:
        env["MOE_TEST_FAULT"] = fault
    if skip_restore:
        env["MOE_TEST_SKIP_RESTORE"] = skip_restore
    cmd = [sys.executable, "-m", "launcher", *TRAIN, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=run_dir.parent, env=env)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def hexes(xs: list[float]) -> list[str]:
    return [x.hex() for x in xs]


def assert_same_run(run_dir: Path, reference: dict) -> None:
    """Every step's loss and gradient norm bit-identical to the uninterrupted run, and metrics.jsonl
    holding each step exactly once with those values."""
    got = summary(run_dir)
    assert len(got["losses"]) == STEPS and got["losses_from_step"] == 0
    assert hexes(got["losses"]) == hexes(reference["losses"])
    assert hexes(got["grad_norms"]) == hexes(reference["grad_norms"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert hexes([r["loss"] for r in rows]) == hexes(reference["losses"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("reference") / "run"
    res = launch(run, [])
    assert res.returncode == 0, res.stderr[-4000:]
    return summary(run)


@pytest.fixture(scope="module")
def killed_once(tmp_path_factory) -> Path:
    """A run whose rank 1 was killed at step 7 with no restart allowed: it stops with the error, and
    its run dir keeps the checkpoint of step 5 (folder step_00000004)."""
    run = tmp_path_factory.mktemp("killed") / "run"
    res = launch(run, ["train.max_failures=0"], fault=KILL_AT_7)
    assert res.returncode == 1, res.stderr[-4000:]
    assert "error: worker rank 1 (node 0) failed; all workers stopped" in res.stderr
    assert "worker rank 1 (node 0) died: the worker process is gone" in res.stderr
    assert "[restart" not in res.stderr
    return run


def test_kill_between_backward_and_optimizer_restarts_bit_identical(reference, tmp_path):
    run = tmp_path / "run"
    res = launch(run, ["train.max_failures=1"], fault=KILL_AT_7)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "[fault] rank 1" in res.stderr + res.stdout
    assert ("[restart 1/1] worker rank 1 (node 0) died" in res.stderr
            and "continues from " + str(run / "checkpoints" / "step_00000004") + " (step 5)" in res.stderr)
    assert "1 restart(s) after worker failures" in res.stdout
    got = summary(run)
    assert got["restarts"] == 1 and got["start_step"] == 5
    assert got["failures"][0].startswith("attempt 1: worker rank 1 (node 0) died")
    assert_same_run(run, reference)


def test_kill_during_checkpoint_write_resumes_from_previous_checkpoint(reference, tmp_path):
    """Rank 1 dies after writing its shards of step 10's checkpoint, before the manifest: that folder
    never becomes visible, and the new group resumes from step 5's."""
    run = tmp_path / "run"
    res = launch(run, ["train.max_failures=1"], fault="kill:rank=1:step=9:where=during_checkpoint")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "continues from " + str(run / "checkpoints" / "step_00000004") + " (step 5)" in res.stderr
    assert summary(run)["failures"][0].startswith("attempt 1: worker rank 1 (node 0) died")
    assert summary(run)["start_step"] == 5
    assert not [p for p in os.listdir(run / "checkpoints") if p.startswith(".tmp")]
    assert_same_run(run, reference)


def test_kill_on_every_attempt_stops_after_max_failures(tmp_path):
    run = tmp_path / "run"
    started = time.monotonic()
    res = launch(run, ["train.max_failures=2", "train.steps=8"], fault=KILL_AT_7 + ":every")
    elapsed = time.monotonic() - started
    assert res.returncode == 1, res.stderr[-4000:]
    err = res.stderr
    assert "training failed 3 times and was restarted 2 times (train.max_failures=2); giving up" in err
    for attempt in (1, 2, 3):
        assert f"attempt {attempt}: worker rank 1 (node 0) died: the worker process is gone" in err
    assert "[restart 1/2]" in err and "[restart 2/2]" in err
    assert f"hydra.run.dir={run}" in err and "continues from" in err  # how to go on after fixing the cause
    assert elapsed < 150, f"three attempts took {elapsed:.0f} s"


def test_worker_stopped_in_all_to_all_is_reported_and_killed(tmp_path):
    """SIGSTOP rank 1 as it enters the expert dispatch all-to-all: rank 0 times out after
    parallel.timeout_s, names group and collective, and the driver kills both workers."""
    run = tmp_path / "run"
    timeout_s = 10
    res = launch(run, [f"parallel.timeout_s={timeout_s}", "train.max_failures=0"],
                 fault="stop:rank=1:step=3:where=all_to_all")
    ended = time.time()
    assert res.returncode == 1, res.stderr[-4000:]
    err = res.stderr
    assert "worker rank 0 (node 0) failed: moe.train.worker.CollectiveFailure: rank 0 failed inside collective " \
           "all_to_all on group 'ep' (world ranks [0, 1]; dispatch, layer 1, forward)" in err, err[-4000:]
    assert f"did not join within parallel.timeout_s={timeout_s} s" in err
    assert "worker rank 1 (node 0) did not answer" in err and "killed with the others" in err
    marker = next((run / ".faults").iterdir())
    stopped_at, pid = marker.stat().st_mtime, int(marker.read_text())
    assert ended - stopped_at < timeout_s + 60, f"reported {ended - stopped_at:.0f} s after the hang"
    assert not _alive(pid), f"the stopped worker (pid {pid}) outlived the driver"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_driver_started_again_continues_from_last_checkpoint(reference, killed_once, tmp_path):
    """The documented way to continue after the driver (or its machine) died: the same command with the
    same hydra.run.dir. The new driver's workers resume from step 5 and the run ends as if never cut."""
    run = tmp_path / "run"
    shutil.copytree(killed_once, run)
    res = launch(run, [])
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'}: continuing at step 5" in res.stderr + res.stdout
    assert summary(run)["restarts"] == 0 and summary(run)["start_step"] == 5
    assert_same_run(run, reference)


def test_negative_control_resume_without_rng_and_data_state_differs(reference, killed_once, tmp_path):
    """The same resume with the RNG and data position left at their fresh-start values (test-only
    switch): the first five steps come from the checkpoint's history, the rest must differ."""
    run = tmp_path / "run"
    shutil.copytree(killed_once, run)
    res = launch(run, [], skip_restore="rng,data")
    assert res.returncode == 0, res.stderr[-4000:]
    got = summary(run)
    assert hexes(got["losses"][:5]) == hexes(reference["losses"][:5])
    assert hexes(got["losses"][5:]) != hexes(reference["losses"][5:])


# Pieces, without Ray: the fault spec, the config check, the in-flight record, the failure ordering.

def test_fault_spec_is_parsed_strictly():
    from moe.train.faults import parse

    (f,) = parse(KILL_AT_7 + ":every")
    assert (f.action, f.rank, f.step, f.where, f.every) == ("kill", 1, 7, "before_optimizer", True)
    assert [g.where for g in parse("stop:where=all_to_all; kill:rank=0:where=during_checkpoint")] == \
        ["all_to_all", "during_checkpoint"]
    with pytest.raises(ValueError, match="action 'explode' must be one of"):
        parse("explode:where=step_start")
    with pytest.raises(ValueError, match="bad field 'where=nowhere'"):
        parse("kill:where=nowhere")
    with pytest.raises(ValueError, match="needs where="):
        parse("kill:rank=1")


def test_fault_points_cost_nothing_when_unset(monkeypatch, tmp_path):
    from moe.train import faults

    monkeypatch.delenv(faults.ENV, raising=False)
    faults.arm(str(tmp_path), 0)
    started = time.perf_counter()
    for step in range(100_000):
        faults.point("before_optimizer", step)
    assert time.perf_counter() - started < 0.5
    assert not (tmp_path / ".faults").exists()


def test_max_failures_must_not_be_negative():
    from launcher.config import ConfigError
    from tests.conftest import job_from

    assert job_from([]).train.max_failures == 0
    assert job_from(["train.max_failures=3"]).train.max_failures == 3
    with pytest.raises(ConfigError, match=r"train.max_failures=-1: must be >= 0"):
        job_from(["train.max_failures=-1"])


def test_in_flight_record_covers_forward_and_backward_collectives():
    import torch

    from moe.parallel import inflight

    seen = []

    class Probe(torch.autograd.Function):  # stands in for a collective: notes the record in both passes
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", inflight.current().describe()))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", inflight.current().describe()))
            return g * 2

    inflight.reset()
    x = torch.ones(3, requires_grad=True)
    y = inflight.autograd_collective("ep", "all_to_all", "dispatch, layer 1", x, Probe.apply)
    assert inflight.current() is None
    (y * 3).sum().backward()
    assert inflight.current() is None
    assert seen == [("fwd", "all_to_all on group 'ep' (dispatch, layer 1, forward)"),
                    ("bwd", "all_to_all on group 'ep' (dispatch, layer 1, backward)")]
    assert torch.equal(x.grad, torch.full((3,), 6.0))
    with pytest.raises(RuntimeError):
        with inflight.collective("dp", "all_reduce", "dense gradients"):
            raise RuntimeError("Timed out waiting 10000ms")
    assert inflight.current().describe() == "all_reduce on group 'dp' (dense gradients)"  # kept for the report
    inflight.reset()


def test_likely_cause_comes_first_and_non_finite_or_capture_errors_are_not_retried():
    from launcher.supervisor import AttemptFailed, RankFailure

    lost = RankFailure(0, 0, "peer_lost", "RuntimeError: Connection closed by peer", "...")
    died = RankFailure(1, 0, "died", "the worker process is gone", "")
    failed = AttemptFailed([lost, died])
    assert failed.primary is died and failed.retryable
    assert failed.details().splitlines()[:2] == [died.headline(), lost.headline()]
    nonfinite = RankFailure(0, 0, "error", "moe.train.loop.NonFiniteError: loss=nan", "NonFiniteError: loss=nan")
    assert not AttemptFailed([nonfinite]).retryable
    capture = RankFailure(0, 0, "error", "moe.train.cuda_graph.CudaGraphCaptureError: train.cuda_graphs: ...",
                          "moe.train.cuda_graph.CudaGraphCaptureError: train.cuda_graphs: capturing failed")
    assert not AttemptFailed([capture]).retryable


def test_run_dir_override_points_to_hydra_run_dir(tmp_path):
    """The run dir is chosen with hydra.run.dir (that is what continues a run); `run_dir=` is refused
    with that advice instead of being silently replaced by a new timestamped folder."""
    res = subprocess.run([sys.executable, "-m", "launcher", f"run_dir={tmp_path / 'mine'}"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2
    assert f"error: run_dir='{tmp_path / 'mine'}': the run dir is Hydra's; choose it with " \
           f"hydra.run.dir={tmp_path / 'mine'}" in res.stderr
