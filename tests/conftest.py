"""Shared test helpers: compose the real Hydra config with overrides."""
from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from launcher.config import register_schema, to_job_config
from moe.config import JobConfig

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose_cfg(overrides: list[str]):
    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def job_from(overrides: list[str]) -> JobConfig:
    return to_job_config(compose_cfg(overrides))


@pytest.fixture
def tiny_job(tmp_path) -> JobConfig:
    """deepseek_tiny on synthetic data, fp32 on CPU, no wandb: the quick training fixture."""
    job = job_from([
        "model=deepseek_tiny", "data=synthetic", "logger.wandb.mode=disabled", "logger.progress_bar=false",
        "train.steps=4", "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_len=32",
        "train.eval_every=0", "train.warmup_steps=1",
    ])
    job.run_dir = str(tmp_path)
    return job
