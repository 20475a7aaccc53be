"""NCCL flight recorder for GPU runs: every worker keeps a ring buffer of its recent collectives and
writes it when a collective times out, so a hang can be traced to the rank and collective that never
joined (`torchfrtrace <dir>` merges the per-rank files). On gloo (CPU) there is no recorder; there the
ranks name the collective themselves (moe.parallel.inflight).

Dumps go to `<run dir>/nccl_flight_recorder/attempt_<n>/rank_<r>`; the driver lists them in its
error. Variables the user already exported (TORCH_NCCL_*, TORCH_FR_*) win over these defaults.
"""
from __future__ import annotations

import os

BUFFER_ENTRIES = "2000"
"""Collectives kept per rank (PyTorch's suggested size; a few hundred bytes each)."""


def folder(run_dir: str, attempt: int) -> str:
    return os.path.join(run_dir, "nccl_flight_recorder", f"attempt_{attempt}")


def worker_env(run_dir: str, attempt: int, use_gpu: bool) -> dict[str, str]:
    """Variables that turn the recorder on and dump it into the run dir on a timeout (GPU runs only)."""
    if not use_gpu:
        return {}
    out = folder(run_dir, attempt)
    os.makedirs(out, exist_ok=True)  # the workers write here; the run dir is shared storage on clusters
    prefix = os.path.join(out, "rank_")
    # Both spellings: TORCH_NCCL_* (torch <= 2.6 and still read) and TORCH_FR_* (newer releases).
    env = {"TORCH_NCCL_TRACE_BUFFER_SIZE": BUFFER_ENTRIES, "TORCH_FR_BUFFER_SIZE": BUFFER_ENTRIES,
           "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
           "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix, "TORCH_FR_DUMP_TEMP_FILE": prefix}
    return {k: os.environ.get(k, v) for k, v in env.items()}


def note(run_dir: str, attempt: int) -> str | None:
    """A line naming the dumps an attempt left, or None when there are none."""
    out = folder(run_dir, attempt)
    files = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not files:
        return None
    return (f"NCCL flight recorder dumps ({len(files)} file(s)): {out}; merge and read them with "
            f"`torchfrtrace {out}` (python -m torch.distributed.flight_recorder.fr_trace)")
