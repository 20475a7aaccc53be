"""Typed configuration schema: one dataclass per Hydra config group, one docstring per field.

These dataclasses are registered in Hydra's ConfigStore by `launcher.config`; the worker side
(`moe.train`) receives the validated `JobConfig` object, never a raw dict.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

# Environment switches of the Triton expert kernel (moe/kernels/), the default first. They are not
# config fields because they tune one kernel, not the job; the launcher checks them before it starts
# anything and passes them on to the workers.
KERNEL_ENV_CHOICES: dict[str, tuple[str, ...]] = {
    "MOE_TRITON_SCATTER": ("bf16", "fp32", "combine"),
    "MOE_TRITON_TMA": ("auto", "0", "1"),
    "MOE_TRITON_WS": ("auto", "0", "1"),
}


def kernel_env_problems(environ: Mapping[str, str]) -> list[str]:
    """One message per kernel switch set to a value it does not take."""
    return [f"{name}={environ[name]!r} is not one of {choices}; unset it for {choices[0]!r}"
            for name, choices in KERNEL_ENV_CHOICES.items() if environ.get(name, choices[0]) not in choices]


def kernel_env(name: str) -> str:
    """The value of kernel switch `name` in this process's environment; ValueError if it is not allowed."""
    value = os.environ.get(name, KERNEL_ENV_CHOICES[name][0])
    if problems := kernel_env_problems({name: value}):
        raise ValueError(problems[0])
    return value


@dataclass
class RouterConfig:
    score_func: str = "sigmoid"
    """How router logits become scores: `sigmoid` (DeepSeek-V3) or `softmax` (Mixtral, GShard)."""
    n_group: int = 1
    """Number of expert groups for group-limited routing; 1 disables it."""
    topk_group: int = 1
    """Groups each token may use (the best `topk_group` by the sum of their top-2 scores)."""
    group_by: str = "experts"
    """What a group stands for: `experts` (fixed blocks of experts), `ep_ranks` or `nodes` (groups
    tied to the expert-parallel topology so each token reaches at most `topk_group` ranks/nodes)."""
    use_expert_bias: bool = True
    """Aux-loss-free balancing: a per-expert bias added to scores for top-k selection only."""
    bias_update_rate: float = 1e-3
    """After each step the bias moves by `rate * sign(mean_load - load_e)`."""
    norm_topk_prob: bool = True
    """Normalise the selected gate weights to sum to 1 per token."""
    route_scale: float = 1.0
    """Multiplier applied to the gate weights after normalisation (DeepSeek-V3 uses 2.5)."""
    aux_loss_coeff: float = 0.0
    """Coefficient of the per-micro-batch Switch/GShard balancing loss `E * sum_e f_e * P_e`."""
    seq_aux_loss_coeff: float = 0.0
    """Coefficient of the same loss computed per sequence and averaged (DeepSeek-V3's)."""
    global_aux_loss_coeff: float = 0.0
    """Coefficient of the balancing loss computed from token counts over all data ranks."""
    z_loss_coeff: float = 0.0
    """Coefficient of the router z-loss, mean over tokens of logsumexp(logits)^2."""
    capacity_factor: float = 0.0
    """Expert capacity = ceil(factor * tokens * k / E); 0 means dropless (no capacity)."""
    drop_policy: str = "probs"
    """Which tokens an over-full expert keeps: `probs` (highest score) or `position` (earliest)."""


@dataclass
class MoEConfig:
    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts chosen per token."""
    expert_intermediate_size: int = 128
    """Hidden width of each routed (and shared) expert's SwiGLU FFN."""
    num_shared_experts: int = 1
    """Experts applied to every token (their widths add up into one SwiGLU block)."""
    backend: str = "auto"
    """Expert compute: `torch` (reference loop), `grouped_mm` (CUDA), `triton`, or `auto`
    (triton on CUDA, torch on CPU)."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Routing and load-balancing settings."""


@dataclass
class ModelConfig:
    name: str = "deepseek_tiny"
    """Name of the preset, for logs."""
    vocab_size: int = 4096
    """Embedding and output vocabulary; must be >= the tokenizer's vocabulary."""
    hidden_size: int = 128
    """Model width D."""
    num_layers: int = 4
    """Transformer blocks."""
    num_dense_layers: int = 1
    """The first this many blocks use a dense SwiGLU MLP instead of MoE."""
    dense_intermediate_size: int = 384
    """Hidden width of the dense SwiGLU MLP."""
    attention: str = "mla"
    """`mla` (multi-head latent attention, DeepSeek) or `gqa` (grouped-query attention)."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 4
    """Key/value heads (GQA only)."""
    head_dim: int = 32
    """Per-head width (GQA only)."""
    q_lora_rank: int = 0
    """MLA query compression rank; 0 means no compression."""
    kv_lora_rank: int = 64
    """MLA key/value compression rank."""
    qk_nope_head_dim: int = 32
    """MLA per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int = 16
    """MLA per-head query/key width with rotary embedding."""
    v_head_dim: int = 32
    """MLA per-head value width."""
    rope_theta: float = 10000.0
    """RoPE base."""
    max_seq_len: int = 1024
    """Longest sequence the model is meant for; train.seq_len may not exceed it."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts block settings."""


@dataclass
class ParallelConfig:
    dp: int = 1
    """Data-parallel degree of the dense part."""
    tp: int = 1
    """Tensor-parallel degree (inside a node)."""
    pp: int = 1
    """Pipeline-parallel degree."""
    ep: int = 1
    """Expert-parallel degree; must divide dp * tp and num_experts."""
    allow_cross_node_ep: bool = False
    """Permit EP groups that span nodes (all-to-all over the network)."""
    ep_comm: str = "nccl"
    """How dispatch and combine move token rows: `nccl` (all_to_all_single) or `p2p` (ranks read each
    other's symmetric-memory buffers over NVLink; GPUs, EP groups inside one node; with the triton
    expert backend the experts write straight into those buffers, other backends pay a copy)."""
    timeout_s: int = 600
    """Timeout of every process group, in seconds."""


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps."""
    seed: int = 0
    """Seed for weights and data sampling."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank; the rest is gradient accumulation."""
    seq_len: int = 128
    """Tokens per sequence."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    dtype: str = "auto"
    """Compute dtype: `auto` (bf16 autocast on GPU, fp32 on CPU), `fp32` or `bf16`."""
    eval_every: int = 50
    """Evaluate on held-out data every this many steps; 0 disables it."""
    eval_batches: int = 4
    """Micro-batches per evaluation."""
    log_every: int = 1
    """Write metrics every this many steps."""
    checkpoint_every: int = 0
    """Save a sharded checkpoint every this many steps (and at the end); 0 disables checkpoints."""
    keep_checkpoints: int = 3
    """Keep the newest this many complete checkpoints; older ones are deleted."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in the run dir, if any; `none`: start
    fresh; or a path to a checkpoint folder written by an earlier run."""
    max_failures: int = 0
    """How many times the launcher restarts the workers after one fails (died, raised, or hung in a
    collective past parallel.timeout_s): it stops them all, starts a fresh group and continues from the
    newest complete checkpoint (train.resume=auto; from step 0 without checkpoints). 0 (the default, as
    Ray Train's FailureConfig) stops at the first failure; errors that would repeat (a non-finite loss)
    are never retried."""
    compile: bool = False
    """torch.compile the dense parts of every block (norms, attention, dense FFN, shared experts) and the
    final norm: their many small elementwise ops (fp32 norms, rotary, SwiGLU) fuse into few kernels.
    The router and routed experts stay eager (data-dependent shapes; the experts have their own
    kernels). Costs a compile at the first step (~40 s for deepseek_small on an H200; on CPU it
    needs a C++ compiler); not yet with parallel.tp > 1 or parallel.pp > 1."""
    cuda_graphs: bool = False
    """Capture one micro-batch's forward and backward as a CUDA graph at the first step and replay it
    for every micro-batch after (moe/train/cuda_graph.py): one launch instead of thousands, for
    small batches where the host, not the GPU, sets the pace. One GPU, dropless routing (capacity
    factor 0), the triton or grouped_mm expert backend; the region timers read the GPU's clock. Costs two eager
    warm-up micro-batches at the capture and keeps the step's activations in the graph's memory pool."""
    deterministic: bool = False
    """Same config, data, seed and world layout give the same bits in every run: PyTorch's deterministic
    algorithms (it raises on an op that has none), a fixed cuBLAS workspace, and the Triton experts'
    fixed-order combine in place of atomics (moe/train/determinism.py). For debugging, for comparing
    runs without noise, and for resuming to the same bits; deepseek_small on an H200 ran at about
    0.8x the default tokens/s."""
    force_balanced_routing: bool = False
    """Replace the router's choices by round-robin (same shapes, every expert equally loaded) to
    measure what real routing costs in throughput; see benchmarks/bench_balanced_routing.py."""


@dataclass
class DataConfig:
    source: str = "stdlib"
    """`stdlib` (a corpus built from Python's own sources, no download), `synthetic` (seeded
    random tokens) or `file` (a token file made by `python -m moe.data.prepare`)."""
    path: str = ""
    """Token file for source=file."""
    cache_dir: str = "~/.cache/moe-launcher"
    """Where the stdlib corpus, tokenizer and token file are cached."""
    tokenizer_vocab_size: int = 4096
    """Vocabulary of the byte-level BPE trained for the stdlib corpus."""
    max_corpus_bytes: int = 8_000_000
    """Cap on the bytes of stdlib text tokenized (keeps the first build quick)."""
    val_fraction: float = 0.05
    """Tail fraction of the token file held out for evaluation."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """`offline` (written into the run dir, sync later), `online` (needs WANDB_API_KEY) or `disabled`."""
    project: str = "moe-launcher"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team or user); None uses the default."""
    name: Optional[str] = None
    """Run name; None derives one from the model and layout."""
    group: Optional[str] = None
    """Run group."""


@dataclass
class AlertsConfig:
    enabled: bool = True
    """Check expert health every step and warn (stdout on the driver, `wandb.alert`, alerts.jsonl)."""
    dead_expert_steps: int = 20
    """Alert when an expert receives no token for this many steps in a row."""
    saturation_factor: float = 4.0
    """Alert when an expert receives more than this many times the mean tokens per expert (the most
    an expert can get is num_experts/top_k times the mean: every token)."""
    diversity_floor: float = 0.3
    """Alert on router collapse: a layer's expert diversity exp(entropy of the load)/E below this
    (1 = uniform; 0.3 on 8 experts = the load of ~2.4 equally used experts)."""
    cooldown_steps: int = 50
    """After an alert of one kind, hold back further alerts of that kind for this many steps (the next
    one says how many were held back): an untrained router crosses the thresholds on most steps, and a
    warning per step is noise that also costs step time. 0 = every new crossing alerts."""


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb settings."""
    progress_bar: bool = True
    """Show a progress bar with loss and tokens/s."""
    timing: bool = True
    """Time the all-to-alls and the expert compute (CUDA events, read at log time; no extra sync)."""
    plot_every: int = 500
    """Every this many steps (and at the last step): heatmaps (tokens per expert, rank x rank traffic)
    as PNG files in the run dir and wandb images, and a wandb histogram of expert loads; 0 disables
    them. One set costs a few hundred ms of host time (matplotlib), so frequent pictures show in the
    step time of small models (BENCHMARKS.md, issue 6)."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device for perf/mfu; None looks the device up (H100/H200: 989 bf16)."""
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    """Expert-health alerts."""


@dataclass
class ClusterConfig:
    address: Optional[str] = None
    """Ray cluster to join (`auto`, `host:port`, `ray://...`); None starts a local Ray."""
    num_workers: int = 1
    """Workers (one per GPU, or CPU slots); equals dp * tp * pp."""
    workers_per_node: int = 0
    """Workers on each node; 0 takes it from the cluster."""
    use_gpu: bool = False
    """One GPU per worker when true; CPU workers otherwise."""
    cpus_per_worker: int = 2
    """CPU cores reserved per worker (and torch threads it uses)."""
    dashboard_host: str = "127.0.0.1"
    """Interface for the local Ray dashboard; keep localhost unless you mean to expose it."""


@dataclass
class LauncherConfig:
    mode: str = "train"
    """`train` runs the job; `plan` prints the layout, memory and traffic without starting workers."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model preset (config group `model`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel degrees (config group `parallel`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and schedule (config group `train`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (config group `data`)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metrics sinks (config group `logger`)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray cluster and workers (config group `cluster`)."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """What the driver does."""
    run_dir: str = "."
    """Where this run writes metrics and summaries; set by the launcher to Hydra's run dir."""
