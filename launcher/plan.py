"""Plan mode: what a config will cost, printed without starting any worker."""
from __future__ import annotations

from moe.config import JobConfig
from moe.model.params import count_params_from_config


def expected_dispatch_bytes(tokens: int, top_k: int, ep: int, hidden: int, bytes_per_elem: int) -> float:
    """Bytes one rank sends in one MoE layer's dispatch under uniform routing (the combine sends as much)."""
    return tokens * top_k * (1 - 1 / ep) * hidden * bytes_per_elem


def print_plan(job: JobConfig) -> None:
    m, par, t = job.model, job.parallel, job.train
    counts = count_params_from_config(m)
    world = par.dp * par.tp * par.pp
    # Mixed precision: bf16 weights, fp32 master weights, gradients and two Adam moments.
    bytes_per_param = 2 + 4 + 4 + 8
    dense = counts.total - counts.routed_experts
    per_gpu_params = dense / (par.tp * par.pp) + counts.routed_experts / (par.ep * par.pp)
    tokens = t.micro_batch_size * t.seq_len
    n_moe = m.num_layers - m.num_dense_layers
    a2a = expected_dispatch_bytes(tokens, m.moe.top_k, par.ep, m.hidden_size, 2)
    print(f"model {m.name}: {counts.total / 1e9:.3f}B parameters, {counts.active / 1e9:.3f}B active per token")
    print(f"layout: world={world} dp={par.dp} tp={par.tp} pp={par.pp} ep={par.ep}")
    print(f"per GPU: {per_gpu_params / 1e9:.3f}B parameters, {per_gpu_params * bytes_per_param / 2**30:.1f} GiB "
          "for weights, gradients and AdamW state (activations not included)")
    print(f"all-to-all per GPU per MoE layer (uniform routing, bf16, {tokens} tokens): "
          f"{a2a / 1e6:.1f} MB dispatch + {a2a / 1e6:.1f} MB combine; {n_moe} MoE layers: "
          f"{2 * a2a * n_moe / 1e9:.2f} GB per forward")
