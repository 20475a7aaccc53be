"""`train.deterministic`: the same config, data, seed and world layout give the same bits every run.

PyTorch's switch (`torch.use_deterministic_algorithms`) makes its own ops pick deterministic kernels,
or raise where it has none, so a new non-deterministic op shows up as an error, not as drift. In our
step that means: index_add / index_put sorted instead of atomic on CUDA; attention leaves cuDNN (its
backward is not deterministic) for flash attention in its deterministic form, with MLA's unequal
head sizes padded to one (`moe.model.attention.attention_one_head_size`; SDPA's other choice is
memory-efficient attention, slower still); cuBLAS with a fixed workspace; and every new buffer
filled with NaN, so a read of memory nobody wrote shows. Our Triton experts follow the same
switch: they sum a token's rows with the fixed-order combine instead of atomics
(`moe/kernels/grouped_swiglu.py`). Collectives are exact data movement (all-to-all, the P2P
pulls) or reductions whose order is fixed by the world layout (NCCL picks the same algorithm for the
same sizes and topology); that part is measured on CPU (gloo) only, as no two-GPU machine has run it.

Measured on an H200 (BENCHMARKS.md): two runs of deepseek_small bitwise equal at every step, with
either expert backend, with train.compile, and with the first kernel configs instead of autotuned
ones; at 0.78-0.82x the tokens/s of a default run (triton; grouped_mm 0.87x). Not promised: equal
bits across world layouts, GPU models or library versions, which change reduction orders.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# cuBLAS repeats its results only with a fixed workspace configuration (NVIDIA's cuBLAS docs, "Results
# reproducibility"); PyTorch refuses cuBLAS calls under deterministic mode without this variable.
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Turn deterministic algorithms on for the `with` body (a no-op when not `enabled`), and put the
    process's previous settings back after it: the training loop may run inside a test process.

    Call before the first cuBLAS call of the process: cuBLAS reads its workspace setting when it
    creates its handle."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
