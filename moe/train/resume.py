"""What a resumed run restores besides weights and optimizer moments, and how its history is stitched.

A checkpoint (moe.train.checkpoint) holds, per rank, the CPU and CUDA RNG state; in its manifest the
step, the data position and the wandb run id; in `history.json` the loss, gradient-norm and balancing
loss of every step from 0. So a run restarted after a failure (by the launcher, or by the user starting
the launcher again on the same run dir) continues bit-identically, logs into the same wandb run, and
its summary covers every step, not only those of the last attempt. Router expert biases are buffers
saved with the weights.

The data position is the index of the next batch; batches are a pure function of (seed, index)
(moe.data), so restoring it is what makes the data after a resume the data the lost steps would
have seen, and it is stored explicitly so a data source with its own state can extend it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from moe.config import JobConfig
from moe.parallel.mesh import ParallelContext
from moe.train import checkpoint, faults

SERIES = ("losses", "grad_norms", "aux_losses")
"""Per-step series kept in the checkpoint's history.json and the summary."""


@dataclass
class ResumeState:
    folder: str | None = None
    """The checkpoint folder resumed from; None for a fresh start."""
    start_step: int = 0
    """The first step this attempt runs."""
    data_step: int = 0
    """Index of the batch the data source hands out at `start_step`."""
    history: dict[str, list[float]] = field(default_factory=dict)
    """SERIES of steps [0, start_step); empty when the checkpoint has none covering all of them."""
    wandb_run_id: str | None = None
    """The wandb run to continue logging into."""


def restore(job: JobConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext,
            root: str) -> ResumeState:
    """Load the checkpoint `train.resume` selects (if any) and return where to continue."""
    t = job.train
    folder = checkpoint.choose(root, t.resume, ctx) if t.resume != "none" else None
    if folder is None:
        return ResumeState()
    extra = checkpoint.load(folder, model, optimizer, ctx, restore_rng=not faults.skip_restore("rng"))
    start = extra["step"] + 1
    # Checkpoints from before the data position was stored: batches were indexed by step.
    data_step = 0 if faults.skip_restore("data") else int(extra.get("data", {}).get("next_batch", start))
    history = checkpoint.load_history(folder)
    if any(len(history.get(k, [])) != start for k in SERIES):
        history = {}  # partial: report only what this run can vouch for (summary's losses_from_step)
    if ctx.rank == 0:
        print(f"[checkpoint] resumed from {folder}: continuing at step {start}", flush=True)
        trim_metrics(job.run_dir, start)
    return ResumeState(folder, start, data_step, history, extra.get("wandb_run_id"))


def trim_metrics(run_dir: str, start_step: int) -> int:
    """Drop metrics.jsonl rows of steps >= start_step (written by an attempt that died after the
    checkpoint; the resumed run writes them again), so the file keeps one row per step. Returns how
    many rows were dropped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    for line in open(path):
        try:
            late = json.loads(line).get("step", -1) >= start_step
        except (ValueError, AttributeError):
            late = False  # not ours to judge: keep it
        if late:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def checkpoint_extra(step: int, next_batch: int, job: JobConfig, wandb_run_id: str | None) -> dict[str, Any]:
    """The manifest's `extra` for the checkpoint taken after `step`."""
    return {"step": step, "data": {"next_batch": next_batch, "source": job.data.source, "seed": job.train.seed},
            "wandb_run_id": wandb_run_id}


def stitched(state: ResumeState, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """SERIES over every step known: the checkpoint's history, then this attempt's `rows` (dicts with
    loss, grad_norm, aux_loss); `losses_from_step` says which step the lists start at."""
    keys = {"losses": "loss", "grad_norms": "grad_norm", "aux_losses": "aux_loss"}
    out: dict[str, Any] = {name: list(state.history.get(name, [])) + [r[key] for r in rows]
                           for name, key in keys.items()}
    out["losses_from_step"] = 0 if state.history or state.start_step == 0 else state.start_step
    return out


def history_to_save(state: ResumeState, rows: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    """SERIES from step 0 for the next checkpoint; None when the start of the history is unknown."""
    series = stitched(state, rows)
    return {k: series[k] for k in SERIES} if series["losses_from_step"] == 0 else None
