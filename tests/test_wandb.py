"""The default offline wandb run, read back from its `.wandb` file; and a fake API key that must leak nowhere.

One training run in a subprocess (as a worker would run it: its own stdout, its own wandb service),
with WANDB_API_KEY set to a fake key, the default `logger.wandb.mode=offline`, the skewed routing of
test_observability (so alerts fire) and wandb's own home directories inside the test's tmp dir, so
every file it writes can be searched."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from moe.train.sinks import redact
from tests.wandb_records import logged_config, logged_rows, read_records

FAKE_KEY = "sk-fake-0123456789abcdef"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ISSUE_KEYS = (
    "train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "perf/step_time_s",
    "perf/max_memory_gib", "moe/load_balancing_loss", "moe/seq_load_balancing_loss",
    "moe/global_load_balancing_loss", "moe/z_loss", "moe/overload_factor", "moe/min_load_factor", "moe/load_cv",
    "moe/dead_experts", "moe/expert_diversity", "moe/dropped_fraction", "moe/rank_overload_factor",
    "moe/expert_bias_absmax", "traffic/dispatch_bytes", "traffic/combine_bytes", "traffic/intra_node_bytes",
    "traffic/inter_node_bytes", "traffic/expected_bytes_uniform", "traffic/a2a_time_s", "traffic/a2a_gbps",
    "perf/expert_compute_time_s", "moe/imbalance_wait_s",
    "moe/overload_factor/layer_1", "moe/load_cv/layer_3",  # per-layer series
    "loss", "lr", "grad_norm", "tokens_per_s",  # legacy names, kept
)

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.conftest import job_from
from tests.test_observability import skewed_routing
from moe.train.loop import train
skewed_routing()
job = job_from(["model=deepseek_tiny", "data=synthetic", "logger.progress_bar=false", "train.steps=3",
                "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_len=16", "train.eval_every=0",
                "train.warmup_steps=1", "logger.plot_every=2", "logger.alerts.dead_expert_steps=2",
                "logger.alerts.diversity_floor=0.6", "logger.wandb.group=obs-test"])
job.run_dir = {run_dir!r}
print("done", train(job)["last_loss"])
"""


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    run_dir, home = tmp / "run", tmp / "wandb_home"
    env = {**os.environ, "WANDB_API_KEY": FAKE_KEY, "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_DATA_DIR": str(home / "data")}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT, run_dir=str(run_dir))], env=env,
                          capture_output=True, text=True, timeout=240, cwd=str(tmp))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    return {"tmp": tmp, "run_dir": run_dir, "wandb_file": files[0], "stdout": proc.stdout, "stderr": proc.stderr}


def test_offline_run_has_every_key_on_the_step_axis(offline_run):
    path = offline_run["wandb_file"]
    rows = logged_rows(path)
    keys = set().union(*rows)
    missing = [k for k in ISSUE_KEYS if k not in keys]
    assert not missing, missing
    metric_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in metric_rows] == [0, 1, 2]
    local = [json.loads(line) for line in open(offline_run["run_dir"] / "metrics.jsonl")]
    for wb, lo in zip(metric_rows, local):  # the same keys and values in both sinks
        assert {k for k in wb if not k.startswith("_")} == set(lo)
        assert wb["train/loss"] == lo["train/loss"] == lo["loss"]
    # Pictures and the load histogram, every 2 steps (and the last).
    media = [r for r in rows if "moe/tokens_per_expert_heatmap/_type" in r]
    assert [r["step"] for r in media] == [0, 2]
    assert media[0]["moe/tokens_per_expert_heatmap/_type"] == "image-file"
    assert media[0]["moe/expert_load_hist/_type"] == "histogram"
    assert len(glob.glob(str(offline_run["run_dir"] / "plots" / "tokens_per_expert_step*.png"))) == 2
    records = read_records(path)
    # define_metric: `step` and every other series plotted against it.
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "step" for m in metrics)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group == "obs-test" and run.display_name.startswith("obs-test-")
    config = logged_config(path)
    assert config["model"]["name"] == "deepseek_tiny" and config["logger"]["wandb"]["mode"] == "offline"


def test_alerts_are_in_the_wandb_run_and_on_stdout(offline_run):
    alerts = [r.alert for r in read_records(offline_run["wandb_file"]) if r.WhichOneof("record_type") == "alert"]
    titles = {a.title for a in alerts}
    assert {"dead experts", "router collapse"} <= titles, titles
    assert all(a.level == "WARN" for a in alerts)
    assert "[moe-alert] WARNING step 1: dead experts" in offline_run["stdout"]
    assert "[moe-alert] WARNING step 0: router collapse" in offline_run["stdout"]


def test_fake_key_leaks_nowhere(offline_run):
    assert FAKE_KEY not in offline_run["stdout"] and FAKE_KEY not in offline_run["stderr"]
    searched = 0
    for dirpath, _, names in os.walk(offline_run["tmp"]):  # run dir (wandb files, logs) and wandb's homes
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert FAKE_KEY.encode() not in f.read(), os.path.join(dirpath, name)
            searched += 1
    assert searched > 5
    logs = glob.glob(str(offline_run["run_dir"] / "wandb" / "offline-run-*" / "logs" / "*.log"))
    assert logs  # the debug logs were there to search
    assert FAKE_KEY not in json.dumps(logged_config(offline_run["wandb_file"]))


def test_redact_removes_secret_keys_and_values():
    cfg = {"logger": {"wandb": {"api_key": "abc", "name": f"run-{FAKE_KEY}"}}, "tags": [FAKE_KEY, "ok"], "n": 3}
    out = redact(cfg, secrets=[FAKE_KEY])
    assert out == {"logger": {"wandb": {"api_key": "<redacted>", "name": "<redacted>"}}, "tags": ["<redacted>", "ok"], "n": 3}


def test_fake_key_leaks_nowhere_through_the_launcher(tmp_path):
    """The whole path: `python -m launcher` with a local Ray and the default offline wandb. The key is in
    the driver's environment; it must not reach stdout/stderr, the run dir (Hydra's `.hydra/` copy of the
    config included), wandb's files or Ray's session logs."""
    import shutil
    import tempfile

    run_dir, home = tmp_path / "run", tmp_path / "wandb_home"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "WANDB_API_KEY": FAKE_KEY, "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_DATA_DIR": str(home / "data"), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "model=deepseek_tiny", "data=synthetic", "train.steps=2",
         "train.global_batch_size=2", "train.micro_batch_size=1", "train.seq_len=16", "train.eval_every=0",
         "cluster.cpus_per_worker=1", f"hydra.run.dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert FAKE_KEY not in proc.stdout and FAKE_KEY not in proc.stderr
        searched: list[str] = []
        for root in (str(tmp_path), ray_tmp):
            for dirpath, _, names in os.walk(root):
                for name in names:
                    path = os.path.join(dirpath, name)
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue  # sockets and links in Ray's session dir
                    with open(path, "rb") as f:
                        assert FAKE_KEY.encode() not in f.read(), path
                    searched.append(path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert any("/.hydra/" in p for p in searched), "Hydra's config copy was not there to search"
    assert any(p.endswith(".wandb") for p in searched), "the wandb run was not there to search"
    assert any("/logs/" in p and p.startswith(ray_tmp) for p in searched), "Ray's session logs were not there to search"
