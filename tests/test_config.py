"""Config composition and validation: every bad input is refused with a message naming it."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from launcher.config import ConfigError
from moe.config import JobConfig
from tests.conftest import compose_cfg, job_from


@pytest.mark.parametrize("model", ["deepseek_tiny", "deepseek_small", "mixtral_small", "deepseek_v3"])
def test_presets_compose_and_validate(model):
    job = job_from([f"model={model}"])
    assert isinstance(job, JobConfig)
    assert job.model.name == model


def test_public_keys_exist():
    job = job_from(["parallel.dp=1", "train.steps=7", "train.seed=3", "train.lr=0.01",
                    "cluster.num_workers=1", "launcher.mode=plan", "logger.wandb.mode=disabled"])
    assert (job.train.steps, job.train.seed, job.train.lr) == (7, 3, 0.01)
    assert job.launcher.mode == "plan" and job.logger.wandb.mode == "disabled"
    for key in ("dp", "tp", "pp", "ep"):
        assert getattr(job.parallel, key) == 1
    for key in ("global_batch_size", "micro_batch_size", "seq_len"):
        assert getattr(job.train, key) >= 1
    for key in ("address", "num_workers", "workers_per_node", "use_gpu"):
        assert hasattr(job.cluster, key)


def test_type_error_is_refused_at_compose():
    with pytest.raises((ValidationError, ConfigCompositionException), match="steps"):
        job_from(["train.steps=many"])


def test_unknown_override_key_is_refused_at_compose():
    with pytest.raises((ConfigKeyError, ConfigCompositionException), match="bogus"):
        job_from(["model.bogus=1"])


def test_plus_key_is_refused_by_our_check():
    # Hydra accepts `+key=` additions even on a structured schema; our own walk must catch them.
    cfg = compose_cfg(["+model.bogus=1"])
    from launcher.config import to_job_config

    with pytest.raises(ConfigError, match=r"model\.bogus: unknown key"):
        to_job_config(cfg)


def test_plus_key_nested_is_refused():
    with pytest.raises(ConfigError, match=r"model\.moe\.router\.typo: unknown key"):
        job_from(["+model.moe.router.typo=0.1"])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.moe.num_experts=6"], r"model\.moe\.router\.n_group=4: must divide model\.moe\.num_experts=6"),
        (["model.moe.top_k=9"], r"model\.moe\.top_k=9: larger than model\.moe\.num_experts=8"),
        (["model.moe.router.topk_group=5"], r"topk_group=5: larger than model\.moe\.router\.n_group=4"),
        (["model.moe.top_k=5"], r"model\.moe\.top_k=5: more than the 4 experts inside topk_group=2"),
        (["parallel.dp=0"], r"parallel\.dp=0: every parallel degree must be >= 1"),
        (["parallel.dp=2"], r"parallel\.dp\*tp\*pp = 2\*1\*1 = 2 but cluster\.num_workers=1"),
        (["parallel.ep=3", "parallel.dp=3", "cluster.num_workers=3", "train.global_batch_size=24"],
         r"parallel\.ep=3: must divide model\.moe\.num_experts=8"),
        (["parallel.ep=2"], r"parallel\.ep=2: must divide dp\*tp=1"),
        # tp with pp: ep borrows its ranks from one stage's dp*tp, not from the world.
        (["parallel.tp=2", "parallel.pp=2", "parallel.ep=4", "cluster.num_workers=4", "train.global_batch_size=8",
          "train.micro_batch_size=2"], r"parallel\.ep=4: must divide dp\*tp=2"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], r"train\.global_batch_size=10: must be a multiple"),
        (["train.seq_len=4096"], r"train\.seq_len=4096: longer than model\.max_seq_len=1024"),
        (["model.moe.router.score_func=tanh"], r"score_func='tanh': must be one of \['sigmoid', 'softmax'\]"),
        (["launcher.mode=fly"], r"launcher\.mode='fly': must be one of"),
        (["logger.wandb.mode=sometimes"], r"logger\.wandb\.mode='sometimes'"),
        (["data.tokenizer_vocab_size=8192"], r"data\.tokenizer_vocab_size=8192: larger than model\.vocab_size=4096"),
        (["data.source=file"], r"data\.source=file needs a token file"),
        (["cluster.num_workers=4", "parallel.dp=4", "cluster.workers_per_node=3"],
         r"cluster\.workers_per_node=3: must divide cluster\.num_workers=4"),
        (["train.lr=0"], r"train\.lr=0\.0: must be > 0"),
        (["train.resume=/no/such/ckpt"], r"train\.resume='/no/such/ckpt': must be `auto`, `none` or an existing"),
        (["train.checkpoint_every=-1"], r"train\.checkpoint_every=-1: must be >= 0"),
        (["logger.alerts.saturation_factor=0.5"], r"logger\.alerts\.saturation_factor=0\.5: must be > 1"),
        (["logger.alerts.cooldown_steps=-1"], r"logger\.alerts\.cooldown_steps=-1: must be >= 0"),
        (["logger.plot_every=-2"], r"logger\.plot_every=-2: must be >= 0"),
        (["parallel.ep_comm=nvshmem"], r"parallel\.ep_comm='nvshmem': must be one of \['nccl', 'p2p'\]"),
        (["parallel.ep_comm=p2p"], r"parallel\.ep_comm='p2p': reads peer GPUs' memory and needs cluster\.use_gpu=true"),
        (["parallel.ep_comm=p2p", "cluster.use_gpu=true", "parallel.allow_cross_node_ep=true"],
         r"parallel\.ep_comm='p2p': works only inside a node"),
    ],
)
def test_cross_field_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        job_from(overrides)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        job_from(["train.lr=-1", "model.moe.top_k=99"])
    assert len(e.value.problems) >= 2


def test_online_wandb_needs_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        job_from(["logger.wandb.mode=online"])


def test_bad_kernel_switch_is_refused_before_start(monkeypatch):
    """A mistyped MOE_TRITON_* value is named by the launcher's checks, before Ray or any worker starts."""
    monkeypatch.setenv("MOE_TRITON_SCATTER", "atomic")
    monkeypatch.setenv("MOE_TRITON_TMA", "yes")
    with pytest.raises(ConfigError) as e:
        job_from([])
    text = "\n".join(e.value.problems)
    assert "MOE_TRITON_SCATTER='atomic' is not one of ('bf16', 'fp32', 'combine'); unset it for 'bf16'" in text
    assert "MOE_TRITON_TMA='yes' is not one of ('auto', '0', '1'); unset it for 'auto'" in text
    monkeypatch.setenv("MOE_TRITON_SCATTER", "combine")
    monkeypatch.delenv("MOE_TRITON_TMA")
    assert isinstance(job_from([]), JobConfig)


def test_deterministic_refuses_atomic_scatter(monkeypatch):
    """train.deterministic takes the Triton experts' combine; an explicit atomic mode would be overridden
    silently, so the launcher names the conflict instead."""
    monkeypatch.setenv("MOE_TRITON_SCATTER", "bf16")
    with pytest.raises(ConfigError, match=r"train.deterministic=true with MOE_TRITON_SCATTER='bf16'"):
        job_from(["train.deterministic=true"])
    assert isinstance(job_from([]), JobConfig)  # atomics are fine without it
    monkeypatch.setenv("MOE_TRITON_SCATTER", "combine")
    assert job_from(["train.deterministic=true"]).train.deterministic
