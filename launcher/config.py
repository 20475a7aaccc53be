"""Schema registration and config validation. Everything here runs before Ray or any worker starts."""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe.config import JobConfig, kernel_env_problems

ENUMS: dict[str, tuple[str, ...]] = {
    "model.attention": ("mla", "gqa"),
    "model.moe.backend": ("auto", "torch", "grouped_mm", "triton"),
    "model.moe.router.score_func": ("sigmoid", "softmax"),
    "model.moe.router.drop_policy": ("probs", "position"),
    "model.moe.router.group_by": ("experts", "ep_ranks", "nodes"),
    "parallel.ep_comm": ("nccl", "p2p"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "data.source": ("stdlib", "synthetic", "file"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
    "launcher.mode": ("train", "plan"),
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def register_schema() -> None:
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


def _unknown_keys(node: Any, schema: type, prefix: str) -> list[str]:
    """Keys present in the composed config but not in the dataclass schema (Hydra lets `+key=` through)."""
    problems = []
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in node.keys() if isinstance(node, (dict, DictConfig)) else []:
        path = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"{path}: unknown key; allowed keys here are {sorted(fields)}")
            continue
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            problems += _unknown_keys(node[key], sub, path + ".")
    return problems


def to_job_config(cfg: DictConfig | dict) -> JobConfig:
    """Turn a composed Hydra config into a validated JobConfig, or raise ConfigError."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    plain = {k: v for k, v in plain.items() if k != "hydra"}
    problems = _unknown_keys(plain, JobConfig, "")
    if problems:
        raise ConfigError(problems)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(JobConfig), plain)
        job = OmegaConf.to_object(typed)
    except Exception as e:  # omegaconf's ValidationError: keep its text, it names the key and value
        raise ConfigError([str(e).splitlines()[0] + " (" + " ".join(str(e).split()[1:6]) + ")"]) from e
    validate(job)
    return job


def _get(job: JobConfig, path: str) -> Any:
    obj: Any = job
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _pipeline_problems(job: JobConfig) -> list[str]:
    """Pipeline parallelism (moe/parallel/pipeline.py): every stage holds at least one layer, and the
    1F1B schedule needs at least pp micro-batches per step to fill the pipeline."""
    par, m, t = job.parallel, job.model, job.train
    if par.pp <= 1:
        return []
    p = []
    if par.pp > m.num_layers:
        p.append(f"parallel.pp={par.pp}: more pipeline stages than model.num_layers={m.num_layers} "
                 "(every stage needs at least one layer)")
    if t.micro_batch_size >= 1 and par.dp >= 1 and t.global_batch_size % (t.micro_batch_size * par.dp) == 0:
        accum = t.global_batch_size // (t.micro_batch_size * par.dp)
        if accum < par.pp:
            p.append(f"parallel.pp={par.pp}: the 1F1B pipeline schedule needs at least pp micro-batches per step, but "
                     f"train.global_batch_size / (train.micro_batch_size * parallel.dp) = {t.global_batch_size}/"
                     f"({t.micro_batch_size}*{par.dp}) = {accum}; raise train.global_batch_size to "
                     f"{par.pp * t.micro_batch_size * par.dp} or more, or lower train.micro_batch_size")
    return p


def _tensor_parallel_problems(job: JobConfig) -> list[str]:
    """Tensor parallelism (moe/parallel/tensor_parallel.py) splits whole heads, hidden widths, the
    vocabulary and (sequence parallel) the sequence evenly over the tp ranks."""
    par, m, t = job.parallel, job.model, job.train
    tp = par.tp
    if tp <= 1:
        return []
    p = []

    def need(path: str, value: int, what: str) -> None:
        if value % tp:
            p.append(f"{path}={value}: must be divisible by parallel.tp={tp} ({what})")

    need("model.num_heads", m.num_heads, "each tp rank computes whole attention heads")
    if m.attention == "gqa":
        need("model.num_kv_heads", m.num_kv_heads, "each tp rank holds whole key/value heads")
    if m.num_dense_layers > 0:
        need("model.dense_intermediate_size", m.dense_intermediate_size, "the dense MLP's hidden width is split")
    if m.moe.num_shared_experts > 0 and m.num_dense_layers < m.num_layers:
        shared = m.moe.expert_intermediate_size * m.moe.num_shared_experts
        if shared % tp:
            p.append(f"model.moe.expert_intermediate_size * model.moe.num_shared_experts = {shared}: must be divisible "
                     f"by parallel.tp={tp} (the shared experts' hidden width is split)")
    need("model.vocab_size", m.vocab_size, "the embedding and output head are split over the vocabulary")
    need("train.seq_len", t.seq_len, "sequence parallel gives each tp rank an equal slice of every sequence")
    # With pp > 1 each stage is sharded over its own tp group (moe/train/pipeline_step.py): the same
    # divisibility rules apply, and nothing else is needed.
    return p


def _cuda_graph_problems(job: JobConfig) -> list[str]:
    """train.cuda_graphs captures a micro-batch as it runs on one GPU: nothing in it may wait for the host."""
    t, par, c, m = job.train, job.parallel, job.cluster, job.model
    if not t.cuda_graphs:
        return []
    fix = "set train.cuda_graphs=false"
    p = []
    if not c.use_gpu:
        p.append(f"train.cuda_graphs=true: needs a GPU (cluster.use_gpu=false); {fix}")
    layout = {"dp": par.dp, "tp": par.tp, "pp": par.pp, "ep": par.ep}
    if any(v > 1 for v in layout.values()):
        degrees = ", ".join(f"parallel.{k}={v}" for k, v in layout.items() if v > 1)
        p.append(f"train.cuda_graphs=true: one GPU only for now ({degrees}); the expert-parallel exchange sizes its "
                 f"buffers on the host and multi-GPU capture is untested; {fix}, or run on one GPU")
    if m.moe.router.capacity_factor > 0:
        p.append(f"train.cuda_graphs=true with model.moe.router.capacity_factor={m.moe.router.capacity_factor}: "
                 f"capacity drops select the kept rows on the host; set the capacity factor to 0 (dropless) or {fix}")
    if m.moe.backend == "torch":
        p.append(f"train.cuda_graphs=true with model.moe.backend=torch: its per-expert loop reads the counts on the "
                 f"host; use auto, triton or grouped_mm, or {fix}")
    return p


def validate(job: JobConfig) -> None:
    """Cross-field checks; collects every problem so one run shows them all."""
    p: list[str] = []
    for path, allowed in ENUMS.items():
        value = _get(job, path)
        if value not in allowed:
            p.append(f"{path}={value!r}: must be one of {list(allowed)}")

    m, moe, r = job.model, job.model.moe, job.model.moe.router
    for path in ("model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
                 "model.dense_intermediate_size", "model.max_seq_len", "model.moe.num_experts",
                 "model.moe.top_k", "model.moe.expert_intermediate_size", "model.moe.router.n_group",
                 "model.moe.router.topk_group"):
        if _get(job, path) < 1:
            p.append(f"{path}={_get(job, path)}: must be >= 1")
    if not 0 <= m.num_dense_layers <= m.num_layers:
        p.append(f"model.num_dense_layers={m.num_dense_layers}: must be between 0 and model.num_layers={m.num_layers}")
    if m.attention == "mla" and m.qk_rope_head_dim % 2:
        p.append(f"model.qk_rope_head_dim={m.qk_rope_head_dim}: rotary embedding needs an even width")
    if m.attention == "gqa":
        if m.num_kv_heads < 1 or m.num_heads % m.num_kv_heads:
            p.append(f"model.num_kv_heads={m.num_kv_heads}: must be >= 1 and divide model.num_heads={m.num_heads}")
        if m.head_dim % 2:
            p.append(f"model.head_dim={m.head_dim}: rotary embedding needs an even width")
    if moe.top_k > moe.num_experts:
        p.append(f"model.moe.top_k={moe.top_k}: larger than model.moe.num_experts={moe.num_experts}")
    if r.group_by == "ep_ranks" and job.parallel.ep >= 1:
        # Groups become the experts of each EP rank; check the same rules against that count.
        r = dataclasses.replace(r, n_group=job.parallel.ep)
    if r.n_group >= 1 and moe.num_experts % r.n_group:
        p.append(f"model.moe.router.n_group={r.n_group}: must divide model.moe.num_experts={moe.num_experts}")
    if r.topk_group > r.n_group:
        p.append(f"model.moe.router.topk_group={r.topk_group}: larger than model.moe.router.n_group={r.n_group}")
    elif r.n_group >= 1 and r.topk_group >= 1 and moe.top_k > r.topk_group * (moe.num_experts // r.n_group):
        p.append(f"model.moe.top_k={moe.top_k}: more than the {r.topk_group * (moe.num_experts // r.n_group)} experts "
                 f"inside topk_group={r.topk_group} of n_group={r.n_group} groups; raise topk_group or lower top_k")
    if r.capacity_factor < 0:
        p.append(f"model.moe.router.capacity_factor={r.capacity_factor}: must be >= 0 (0 = dropless)")
    if r.bias_update_rate < 0:
        p.append(f"model.moe.router.bias_update_rate={r.bias_update_rate}: must be >= 0")
    for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "global_aux_loss_coeff", "z_loss_coeff"):
        if getattr(r, name) < 0:
            p.append(f"model.moe.router.{name}={getattr(r, name)}: must be >= 0")

    par, c = job.parallel, job.cluster
    degrees = {d: getattr(par, d) for d in ("dp", "tp", "pp", "ep")}
    for d, v in degrees.items():
        if v < 1:
            p.append(f"parallel.{d}={v}: every parallel degree must be >= 1")
    if all(v >= 1 for v in degrees.values()):
        world = par.dp * par.tp * par.pp
        if world != c.num_workers:
            p.append(f"parallel.dp*tp*pp = {par.dp}*{par.tp}*{par.pp} = {world} but cluster.num_workers={c.num_workers}; "
                     f"they must be equal (set cluster.num_workers={world} or change the degrees)")
        if (par.dp * par.tp) % par.ep:
            p.append(f"parallel.ep={par.ep}: must divide dp*tp={par.dp * par.tp} (EP borrows its ranks from dp and tp)")
        if moe.num_experts % par.ep:
            p.append(f"parallel.ep={par.ep}: must divide model.moe.num_experts={moe.num_experts}")
    if par.timeout_s < 1:
        p.append(f"parallel.timeout_s={par.timeout_s}: must be >= 1")
    if par.ep_comm == "p2p":
        # Ranks read each other's GPU memory: only GPUs of one node can, and the launcher cannot check
        # the node split of a cross-node EP group before it has placed the workers.
        if not c.use_gpu:
            p.append("parallel.ep_comm='p2p': reads peer GPUs' memory and needs cluster.use_gpu=true; "
                     "use parallel.ep_comm=nccl on CPU")
        if par.allow_cross_node_ep:
            p.append("parallel.ep_comm='p2p': works only inside a node but parallel.allow_cross_node_ep=true lets EP "
                     "groups span nodes; set parallel.allow_cross_node_ep=false or parallel.ep_comm=nccl")
    if c.num_workers < 1:
        p.append(f"cluster.num_workers={c.num_workers}: must be >= 1")
    if c.workers_per_node < 0:
        p.append(f"cluster.workers_per_node={c.workers_per_node}: must be >= 0 (0 = take it from the cluster)")
    elif c.workers_per_node > 0 and c.num_workers % c.workers_per_node:
        p.append(f"cluster.workers_per_node={c.workers_per_node}: must divide cluster.num_workers={c.num_workers} "
                 "(every node hosts the same number of workers)")
    if c.cpus_per_worker < 1:
        p.append(f"cluster.cpus_per_worker={c.cpus_per_worker}: must be >= 1")

    t = job.train
    for name in ("steps", "global_batch_size", "micro_batch_size", "seq_len"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}={getattr(t, name)}: must be >= 1")
    if t.micro_batch_size >= 1 and par.dp >= 1 and t.global_batch_size % (t.micro_batch_size * par.dp):
        p.append(f"train.global_batch_size={t.global_batch_size}: must be a multiple of train.micro_batch_size * "
                 f"parallel.dp = {t.micro_batch_size}*{par.dp} = {t.micro_batch_size * par.dp}")
    p += _pipeline_problems(job)
    p += _tensor_parallel_problems(job)
    if t.seq_len > m.max_seq_len:
        p.append(f"train.seq_len={t.seq_len}: longer than model.max_seq_len={m.max_seq_len}")
    if t.lr <= 0:
        p.append(f"train.lr={t.lr}: must be > 0")
    if not 0 <= t.min_lr_ratio <= 1:
        p.append(f"train.min_lr_ratio={t.min_lr_ratio}: must be between 0 and 1")
    for name in ("warmup_steps", "eval_every", "eval_batches"):
        if getattr(t, name) < 0:
            p.append(f"train.{name}={getattr(t, name)}: must be >= 0")
    if t.log_every < 1:
        p.append(f"train.log_every={t.log_every}: must be >= 1")
    if t.checkpoint_every < 0:
        p.append(f"train.checkpoint_every={t.checkpoint_every}: must be >= 0 (0 disables checkpoints)")
    if t.keep_checkpoints < 1:
        p.append(f"train.keep_checkpoints={t.keep_checkpoints}: must be >= 1")
    if t.resume not in ("auto", "none") and not os.path.isdir(os.path.expanduser(t.resume)):
        p.append(f"train.resume={t.resume!r}: must be `auto`, `none` or an existing checkpoint folder "
                 "(runs/<run>/checkpoints/step_NNNNNNNN)")
    if t.max_failures < 0:
        p.append(f"train.max_failures={t.max_failures}: must be >= 0 (0 = stop at the first worker failure; "
                 "N = restart the workers up to N times from the last checkpoint)")
    if t.compile and (par.tp > 1 or par.pp > 1):
        p.append(f"train.compile=true: not supported with parallel.tp={par.tp}, parallel.pp={par.pp} yet (DTensor "
                 "and pipeline stages are untested under torch.compile); set train.compile=false, or tp=pp=1")
    p += _cuda_graph_problems(job)
    if t.grad_clip < 0:
        p.append(f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables clipping)")

    d = job.data
    if d.source == "file" and not d.path:
        p.append("data.path='': data.source=file needs a token file; make one with `python -m moe.data.prepare`")
    if d.source == "stdlib" and d.tokenizer_vocab_size > m.vocab_size:
        p.append(f"data.tokenizer_vocab_size={d.tokenizer_vocab_size}: larger than model.vocab_size={m.vocab_size}")
    if d.source == "stdlib" and d.tokenizer_vocab_size < 257:
        p.append(f"data.tokenizer_vocab_size={d.tokenizer_vocab_size}: a byte-level BPE needs at least 257 tokens")
    if not 0 < d.val_fraction < 1:
        p.append(f"data.val_fraction={d.val_fraction}: must be between 0 and 1 (exclusive)")
    lg, al = job.logger, job.logger.alerts
    if lg.plot_every < 0:
        p.append(f"logger.plot_every={lg.plot_every}: must be >= 0 (0 disables the heatmaps)")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        p.append(f"logger.peak_tflops={lg.peak_tflops}: must be > 0, or null to use the device's known peak")
    if al.dead_expert_steps < 1:
        p.append(f"logger.alerts.dead_expert_steps={al.dead_expert_steps}: must be >= 1")
    if al.saturation_factor <= 1:
        p.append(f"logger.alerts.saturation_factor={al.saturation_factor}: must be > 1 (a multiple of the mean load)")
    if al.cooldown_steps < 0:
        p.append(f"logger.alerts.cooldown_steps={al.cooldown_steps}: must be >= 0 (0 = no cooldown)")
    if not 0 <= al.diversity_floor <= 1:
        p.append(f"logger.alerts.diversity_floor={al.diversity_floor}: must be between 0 and 1")
    p += kernel_env_problems(os.environ)
    if job.train.deterministic and os.environ.get("MOE_TRITON_SCATTER", "combine") != "combine":
        p.append(f"train.deterministic=true with MOE_TRITON_SCATTER={os.environ['MOE_TRITON_SCATTER']!r}: those "
                 "atomic adds are not reproducible; unset it (deterministic runs take 'combine')")
    if job.logger.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        p.append("logger.wandb.mode='online': needs WANDB_API_KEY in the environment (or use offline and `wandb sync` later)")
    if p:
        raise ConfigError(p)
