"""Model FLOPs utilisation: useful training FLOPs per step over what the devices could do.

    MFU = tokens * (6 * N_active + 6 * L * H * S * (d_qk + d_v)) / (step_time * world * peak)

- `N_active`: parameters a token passes through in matmuls: every parameter except the routed experts
  it does not pick (top_k of num_experts per MoE layer) and the input embedding (a lookup, no matmul);
  the output head counts. 6 = 2 (multiply-add) x 3 (forward, and backward for inputs and weights).
- The attention term is PaLM's (appendix B): QK^T and AV cost 2*S*d_qk and 2*S*d_v per head per token
  forward, x3 for training, over L layers and H heads, counted without the causal halving (as PaLM and
  Megatron do, so numbers compare). MLA: d_qk = qk_nope_head_dim + qk_rope_head_dim, d_v = v_head_dim.
- `peak`: dense bf16 tensor-core FLOP/s of one device (no sparsity), looked up by device name or
  given as `logger.peak_tflops`. There is no agreed peak for a CPU, so on CPU MFU is null.
"""
from __future__ import annotations

import torch

from moe.config import ModelConfig
from moe.model.params import count_params_from_config

# Dense bf16 peak TFLOP/s from the vendors' data sheets (the "with sparsity" figures halved).
# Checked in order: the first substring found in the device name wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM; also what the H100 machines here report ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # same compute die as H100 SXM, more memory
    ("A100", 312.0),
)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (see the module docstring for the formula)."""
    n_active = count_params_from_config(cfg).active - cfg.vocab_size * cfg.hidden_size  # minus the lookup table
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    attention = 6 * cfg.num_layers * cfg.num_heads * seq_len * (d_qk + d_v)
    return 6.0 * n_active + attention


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, where it came from / why there is none)."""
    if override_tflops:
        return override_tflops * 1e12, f"logger.peak_tflops={override_tflops:g}"
    if device.type != "cuda":
        return None, f"no agreed peak FLOP/s for device type {device.type!r}; set logger.peak_tflops to get perf/mfu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16"
    return None, f"unknown device {name!r}; set logger.peak_tflops to get perf/mfu"


def mfu(flops_per_token: float, tokens: int, step_time_s: float, world: int, peak_flops: float | None) -> float | None:
    if peak_flops is None or step_time_s <= 0:
        return None
    return flops_per_token * tokens / (step_time_s * world * peak_flops)
