"""Small building blocks: RMSNorm, rotary embeddings, the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision.
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def rope_cos_sin(seq_len: int, dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, dim/2] for rotating `dim` channels (computed in fp32, not stored as params)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles_SR = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_SR.cos(), angles_SR.sin()


class RotaryTables(nn.Module):
    """The cos/sin tables of `rope_cos_sin` up to `max_seq_len`, computed once.

    A forward used to rebuild them (nine small kernels per attention layer and micro-batch). They are
    non-persistent fp32 buffers: they follow the module to its device, and checkpoints leave them out.
    """

    def __init__(self, max_seq_len: int, dim: int, theta: float) -> None:
        super().__init__()
        self.dim, self.theta = dim, theta
        cos_SR, sin_SR = rope_cos_sin(max_seq_len, dim, theta, torch.device("cpu"))
        self.register_buffer("cos_SR", cos_SR, persistent=False)
        self.register_buffer("sin_SR", sin_SR, persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cos_SR.shape[0]:  # longer than the model was built for (tests): compute
            return rope_cos_sin(seq_len, self.dim, self.theta, self.cos_SR.device)
        return self.cos_SR[:seq_len], self.sin_SR[:seq_len]


def apply_rope(x_BHSR: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [..., S, R] (R even)."""
    if isinstance(x_BHSR, DTensor):  # tensor parallel (heads sharded or replicated): the tables are the same everywhere
        mesh = x_BHSR.device_mesh
        cos_SR, sin_SR = (DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False) for t in (cos_SR, sin_SR))
    x32 = x_BHSR.float().unflatten(-1, (-1, 2))
    x1, x2 = x32[..., 0], x32[..., 1]
    out = torch.stack((x1 * cos_SR - x2 * sin_SR, x1 * sin_SR + x2 * cos_SR), dim=-1)
    return out.flatten(-2).to(x_BHSR.dtype)


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
