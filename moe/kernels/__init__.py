"""Triton kernels. Importing this package imports triton; `moe.model.experts` does so only for backend=triton."""
from moe.kernels.grouped_swiglu import triton_routed_experts

__all__ = ["triton_routed_experts"]
