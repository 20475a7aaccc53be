"""Plan mode: the layout, memory and all-to-all traffic a config will have, printed without starting workers.

The cluster is assumed, not read: `cluster.workers_per_node` workers on each node (all of
`cluster.num_workers` on one node when it is 0). Traffic assumes uniform routing (every token's k
experts spread evenly over the EP ranks), the regime the seed documents' worked example uses.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.topology import Layout, RankPlacement, assumed_placements, format_table, layout_problems
from moe.config import JobConfig
from moe.model.params import count_params_from_config

GPU_MEMORY_GIB = 80.0
"""An H100's memory, for the warning when the per-GPU estimate does not fit."""


def expected_dispatch_bytes(tokens: int, top_k: int, ep: int, hidden: int, bytes_per_elem: int) -> float:
    """Bytes one rank sends in one MoE layer's dispatch under uniform routing (the combine sends as much)."""
    return tokens * top_k * (1 - 1 / ep) * hidden * bytes_per_elem


@dataclass
class TrafficPlan:
    """All-to-all traffic of one GPU (the worst rank of the layout), uniform routing."""

    tokens_per_gpu: int
    """Tokens of one micro-batch on one GPU."""
    vectors_per_layer: float
    """Token vectors sent to other ranks in one MoE layer's dispatch."""
    bytes_per_vector: int
    dispatch_bytes: float
    """Bytes sent per MoE layer in the dispatch (the combine sends as many back)."""
    intra_node_bytes: float
    """Part of `dispatch_bytes` that stays inside the node."""
    inter_node_bytes: float
    """Part of `dispatch_bytes` that crosses the network."""
    moe_layers: int
    micro_batches: int
    """Micro-batches per optimizer step on one rank (gradient accumulation)."""

    @property
    def forward_bytes(self) -> float:
        """Dispatch + combine over every MoE layer, one micro-batch's forward pass."""
        return 2 * self.dispatch_bytes * self.moe_layers

    @property
    def step_bytes(self) -> float:
        """Forward and backward (the backward moves as much again) over every micro-batch of a step."""
        return 2 * self.forward_bytes * self.micro_batches


def traffic_plan(tokens: int, top_k: int, hidden: int, bytes_per_elem: int, moe_layers: int, micro_batches: int,
                 placements: list[RankPlacement]) -> TrafficPlan:
    """Split each rank's dispatch by where its EP peers live; report the rank with the most inter-node bytes."""
    node_of_rank = [p.node_index for p in placements]
    worst = (0, 0)  # (peers on other nodes, peers on my node)
    ep = len(placements[0].groups["ep"])
    for p in placements:
        peers = [r for r in p.groups["ep"] if r != p.rank]
        remote = sum(node_of_rank[r] != p.node_index for r in peers)
        worst = max(worst, (remote, len(peers) - remote))
    per_peer_vectors = tokens * top_k / ep
    bpv = hidden * bytes_per_elem
    remote, local = worst
    return TrafficPlan(tokens_per_gpu=tokens, vectors_per_layer=per_peer_vectors * (ep - 1), bytes_per_vector=bpv,
                       dispatch_bytes=expected_dispatch_bytes(tokens, top_k, ep, hidden, bytes_per_elem),
                       intra_node_bytes=per_peer_vectors * local * bpv,
                       inter_node_bytes=per_peer_vectors * remote * bpv,
                       moe_layers=moe_layers, micro_batches=micro_batches)


@dataclass
class MemoryPlan:
    """Per-GPU memory, in bytes. fp32 master weights (bf16 autocast makes transient copies), fp32
    gradients, AdamW's two fp32 moments; no sharding of the dense part (no FSDP/ZeRO in this version)."""

    params: float
    weights: float
    grads: float
    optimizer: float
    activations: float
    """Rough estimate for one micro-batch without recomputation (tensors saved for backward)."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def activation_bytes(job: JobConfig, tokens: int, act_bytes: int) -> float:
    """Saved activations of one micro-batch: per layer the norm, projections and attention output, the
    MLP or the routed tokens' expert hiddens (k copies per token), router scores, then the logits."""
    m = job.model
    D, H, T, k = m.hidden_size, m.num_heads, tokens, m.moe.top_k
    if m.attention == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        qkv = H * (2 * qk + 2 * m.v_head_dim) + m.kv_lora_rank + m.qk_rope_head_dim
    else:
        qkv = (H + 2 * m.num_kv_heads) * m.head_dim + H * m.head_dim
    attn = T * (3 * D + qkv) * act_bytes
    dense_mlp = T * (2 * D + 3 * m.dense_intermediate_size) * act_bytes
    F, shared = m.moe.expert_intermediate_size, m.moe.num_shared_experts
    moe_mlp = (T * k * (2 * D + 3 * F) + T * (D + 3 * F * shared)) * act_bytes + T * m.moe.num_experts * 4
    n_moe = m.num_layers - m.num_dense_layers
    logits = T * m.vocab_size * (act_bytes + 4)  # logits and their fp32 copy for the loss
    return m.num_dense_layers * (attn + dense_mlp) + n_moe * (attn + moe_mlp) + logits + T * D * act_bytes


def memory_plan(job: JobConfig, tokens: int, act_bytes: int) -> MemoryPlan:
    par = job.parallel
    counts = count_params_from_config(job.model)
    dense = counts.total - counts.routed_experts
    params = dense / (par.tp * par.pp) + counts.routed_experts / (par.ep * par.pp)
    return MemoryPlan(params=params, weights=4 * params, grads=4 * params, optimizer=8 * params,
                      # 1F1B: stage s keeps pp - s micro-batches in flight, so the first stage holds about
                      # pp x (1/pp of the layers) = one micro-batch of the whole model, not 1/pp of it.
                      activations=activation_bytes(job, tokens, act_bytes))


def plan_workers_per_node(job: JobConfig) -> int:
    return job.cluster.workers_per_node or job.cluster.num_workers


def activation_dtype_bytes(job: JobConfig) -> int:
    """bf16 where training autocasts (GPU with train.dtype=auto, or bf16), fp32 otherwise."""
    t = job.train.dtype
    return 2 if t == "bf16" or (t == "auto" and job.cluster.use_gpu) else 4


def pipeline_plan_line(job: JobConfig, micro_batches: int) -> str:
    """The stage split (moe/parallel/pipeline.py's cost model) and the 1F1B bubble."""
    from moe.parallel.pipeline import layer_costs, stage_layers

    par, m = job.parallel, job.model
    ranges = stage_layers(m, par.pp, job.train.seq_len)
    costs, _, head = layer_costs(m, job.train.seq_len)
    parts = []
    for s, r in enumerate(ranges):
        extra = (" + embeddings" if s == 0 else "") + (" + norm/head" if s == par.pp - 1 else "")
        cost = sum(costs[i] for i in r) + (head if s == par.pp - 1 else 0.0)
        parts.append(f"stage {s}: layers {r.start}-{r.stop - 1}{extra} ({cost / 1e6:,.0f} MFLOP/token fwd)")
    bubble = (par.pp - 1) / (micro_batches + par.pp - 1)
    # What one rank sends to the next stage per micro-batch (and receives back as its gradient): the fp32
    # residual stream; under tp each rank sends only its sequence slice to the same tp rank of the next stage.
    t = job.train
    send_bytes = t.micro_batch_size * (t.seq_len // par.tp) * m.hidden_size * 4
    shape = f"[{t.micro_batch_size}, {t.seq_len}/{par.tp}, {m.hidden_size}]" if par.tp > 1 else \
        f"[{t.micro_batch_size}, {t.seq_len}, {m.hidden_size}]"
    each_stage = f"; every stage sharded over its own tp={par.tp} ranks" if par.tp > 1 else ""
    return (f"pipeline: {'; '.join(parts)}{each_stage}; 1F1B over {micro_batches} micro-batches, bubble "
            f"(pp-1)/(m+pp-1) = {bubble:.0%}; per micro-batch each rank sends {shape} fp32 = "
            f"{send_bytes / 1e6:,.2f} MB to the next stage (and as much back in the backward)")


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def print_plan(job: JobConfig) -> list[str]:
    """Print the plan; return the reasons the layout would be refused ([] when it would run)."""
    m, par, t, c = job.model, job.parallel, job.train, job.cluster
    layout = Layout(par.dp, par.tp, par.pp, par.ep)
    wpn = plan_workers_per_node(job)
    problems = layout_problems(layout, wpn, par.allow_cross_node_ep)
    counts = count_params_from_config(m)
    print(f"model {m.name}: {counts.total / 1e9:.3f}B parameters, {counts.active / 1e9:.3f}B active per token")
    print(f"layout: world={layout.world} dp={par.dp} tp={par.tp} pp={par.pp} ep={par.ep} edp={layout.edp}; "
          f"assumed {wpn} {'GPU' if c.use_gpu else 'CPU'} workers per node"
          + ("" if c.workers_per_node else " (cluster.workers_per_node=0: all on one node)"))
    placements = None
    if layout.world % wpn == 0:
        placements = assumed_placements(layout, wpn, c.use_gpu)
        print(format_table(placements))

    tokens = t.micro_batch_size * t.seq_len
    act_b = activation_dtype_bytes(job)
    mem = memory_plan(job, tokens, act_b)
    print(f"per GPU: {mem.params / 1e9:.3f}B parameters; weights {mem.weights / 2**30:.2f} GiB, gradients "
          f"{mem.grads / 2**30:.2f} GiB, AdamW state {mem.optimizer / 2**30:.2f} GiB, activations ~"
          f"{mem.activations / 2**30:.2f} GiB ({tokens} tokens per micro-batch): ~{mem.total / 2**30:.2f} GiB")
    if c.use_gpu and mem.total / 2**30 > GPU_MEMORY_GIB:
        print(f"warning: ~{mem.total / 2**30:.0f} GiB per GPU does not fit an {GPU_MEMORY_GIB:g} GiB GPU; raise "
              "parallel.ep, parallel.tp or parallel.pp, or lower train.micro_batch_size")

    n_moe = m.num_layers - m.num_dense_layers
    accum = max(t.global_batch_size // max(t.micro_batch_size * par.dp, 1), 1)
    if 1 < par.pp <= m.num_layers:
        print(pipeline_plan_line(job, accum))
    if placements is not None and par.ep > 1:
        # Sequence parallel: each tp rank routes its own 1/tp of the micro-batch's tokens.
        routed = tokens // par.tp
        tr = traffic_plan(routed, m.moe.top_k, m.hidden_size, act_b, n_moe, accum, placements)
        transport = ("p2p: peers read symmetric-memory buffers over NVLink" if par.ep_comm == "p2p"
                     else "nccl all_to_all_single")
        print(f"all-to-all transport (parallel.ep_comm): {transport}")
        print(f"all-to-all per GPU per MoE layer (uniform routing, {routed} tokens, {tr.bytes_per_vector:,} B per "
              f"token vector): {tr.vectors_per_layer:,.0f} token vectors = {tr.dispatch_bytes / 1e6:,.1f} MB dispatch "
              f"({tr.intra_node_bytes / 1e6:,.1f} MB intra-node, {tr.inter_node_bytes / 1e6:,.1f} MB inter-node) "
              "+ as much in the combine")
        print(f"all-to-all per GPU over {n_moe} MoE layers: {_gb(tr.forward_bytes)} per forward pass "
              f"(dispatch+combine); per step ({accum} micro-batches, forward+backward): {_gb(tr.step_bytes)}, "
              f"of which {_gb(tr.step_bytes * tr.inter_node_bytes / tr.dispatch_bytes)} inter-node")
    else:
        print("all-to-all: none (parallel.ep=1: every rank holds every expert)")
    counts_dense = counts.total - counts.routed_experts
    dp_bytes = 2 * (par.dp - 1) / par.dp * counts_dense / (par.tp * par.pp) * 4
    edp = layout.edp
    ep_bytes = 2 * (edp - 1) / edp * counts.routed_experts / (par.ep * par.pp) * 4
    print(f"gradient all-reduce per GPU per step (ring, fp32): dense over dp={par.dp}: {_gb(dp_bytes)}, "
          f"experts over edp={edp}: {_gb(ep_bytes)}")
    if problems:
        print("REFUSED: this layout would not be started:\n" + "\n".join(f"  - {p}" for p in problems))
    return problems
