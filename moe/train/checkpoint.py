"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout-independent keys make resharding free: dense tensors keep their parameter name (every rank
holds the same copy, DCP writes it once), and each routed expert is its own key
(`<param>.expert_<e>` with the global expert id), written by the rank that holds it. Loading under
another ep (or on one process) asks for the experts the new rank holds. Optimizer moments use the
same keys under `optim.exp_avg.` / `optim.exp_avg_sq.`.

A checkpoint is written into `.tmp-step_N`, then rank 0 writes `manifest.json` (sha256 of every
file) and renames the folder to `step_N`: a folder without a manifest, or whose files do not match
it, is never loaded. Only checkpoints under the run's own folder or a path the user names are read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moe.parallel.grads import is_expert_param
from moe.parallel.inflight import collective
from moe.parallel.mesh import ParallelContext
from moe.train import faults

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that must not or cannot be loaded."""


def _local_expert_ids(model: torch.nn.Module, ctx: ParallelContext) -> list[int]:
    moe = next(iter(model.moe_layers().values()), None)
    if moe is None:
        return []
    per_rank = moe.experts.num_experts
    return [ctx.ep_rank * per_rank + i for i in range(per_rank)]


def _split(name: str, tensor: torch.Tensor, expert_ids: list[int]) -> dict[str, torch.Tensor]:
    if not is_expert_param(name):
        return {name: tensor}
    return {f"{name}.expert_{e}": tensor[i] for i, e in enumerate(expert_ids)}


def _state_views(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext,
                 ensure_optim: bool) -> dict[str, torch.Tensor]:
    """Views into the live tensors under layout-independent keys (DCP loads in place through them)."""
    ids = _local_expert_ids(model, ctx)
    state: dict[str, torch.Tensor] = {}
    # As torch's AdamW creates it: a fused or capturable step keeps `step` on the parameter's device
    # (a CPU step there fails the first update after a resume), otherwise on the CPU.
    step_on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for name, p in model.named_parameters():
        state.update(_split(name, p.data, ids))
        if ensure_optim and p not in optimizer.state:
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if step_on_device else "cpu"),
                                  "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        st = optimizer.state.get(p)
        if st:
            for moment in ("exp_avg", "exp_avg_sq"):
                state.update({f"optim.{moment}.{k}": v for k, v in _split(name, st[moment], ids).items()})
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            state[name] = buf
    return state


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, fs in os.walk(folder) for f in fs if f != "manifest.json")


def verify(folder: str) -> dict[str, Any]:
    """The manifest of a complete, untouched checkpoint; CheckpointError otherwise."""
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path) or not os.path.isfile(os.path.join(folder, ".metadata")):
        raise CheckpointError(f"{folder} is incomplete (no manifest.json or .metadata): it was not finished")
    manifest = json.load(open(manifest_path))
    files = manifest.get("files", {})
    if sorted(files) != _files(folder):
        raise CheckpointError(f"{folder}: its files differ from its manifest; refusing to load it")
    for rel, digest in files.items():
        if _sha256(os.path.join(folder, rel)) != digest:
            raise CheckpointError(f"{folder}/{rel}: sha256 differs from the manifest; refusing to load it")
    return manifest


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, folder) of the finished checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.listdir(root):
        m = STEP_DIR.match(entry)
        if m and os.path.isfile(os.path.join(root, entry, "manifest.json")):
            found.append((int(m.group(1)), os.path.join(root, entry)))
    return sorted(found)


def _barrier(ctx: ParallelContext, what: str) -> None:
    if ctx.distributed:
        with collective("world", "barrier", what):
            dist.barrier()


def save(root: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext,
         extra: dict[str, Any], keep: int, history: dict[str, list[float]] | None = None) -> str:
    """Write the checkpoint of the state after `step` (all ranks call this together). `extra` goes into
    the manifest (small: step, data position, wandb run id); `history` (per-step series from step 0,
    identical on every rank) into `history.json`, written by rank 0 and covered by the manifest."""
    tmp = os.path.join(root, f".tmp-step_{step:08d}")
    final = os.path.join(root, f"step_{step:08d}")
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that died part-way
        os.makedirs(tmp)
    _barrier(ctx, f"checkpoint step {step}: folder created")
    dcp.save(_state_views(model, optimizer, ctx, ensure_optim=False), checkpoint_id=tmp)
    # Each rank's RNG (no dropout today, but sampling code may use it): its own small file.
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng_rank{ctx.rank}.pt"))
    if ctx.rank == 0 and history is not None:
        with open(os.path.join(tmp, "history.json"), "w") as f:
            json.dump(history, f)
    faults.point("during_checkpoint")  # test-only: die with the data written but no manifest yet
    _barrier(ctx, f"checkpoint step {step}: shards written")
    if ctx.rank == 0:
        manifest = {"step": step, "world_size": ctx.world_size, "extra": extra,
                    "files": {rel: _sha256(os.path.join(tmp, rel)) for rel in _files(tmp)}}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the only moment it becomes visible: atomic
        for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(ctx, f"checkpoint step {step}: published")
    return final


def choose(root: str, resume: str, ctx: ParallelContext) -> str | None:
    """The folder to resume from (rank 0 decides and verifies; every rank gets the same answer)."""
    choice: list[Any] = [None]
    if ctx.rank == 0:
        try:
            if resume == "auto":
                for _, folder in reversed(complete_checkpoints(root)):
                    try:
                        verify(folder)
                        choice[0] = folder
                        break
                    except CheckpointError as e:
                        print(f"[checkpoint] skipping {folder}: {e}", flush=True)
            elif resume != "none":
                verify(resume)
                choice[0] = resume
        except CheckpointError as e:
            choice[0] = e
    if ctx.distributed:
        with collective("world", "broadcast", "which checkpoint to resume from"):
            dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], CheckpointError):
        raise choice[0]
    return choice[0]


def load(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext,
         restore_rng: bool = True) -> dict[str, Any]:
    """Load `folder` into the live model and optimizer in place, and this rank's RNG state (CPU and
    CUDA) when saved at the same world size; returns the manifest's `extra`."""
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    dcp.load(_state_views(model, optimizer, ctx, ensure_optim=True), checkpoint_id=folder)
    step = float(manifest["step"] + 1)  # optimizer steps taken so far (steps are 0-based)
    for st in optimizer.state.values():  # on the device the optimizer keeps it (fused AdamW: the GPU)
        st["step"] = torch.tensor(step, dtype=torch.float32, device=st["step"].device)
    rng = os.path.join(folder, f"rng_rank{ctx.rank}.pt")
    if restore_rng and manifest.get("world_size") == ctx.world_size and os.path.isfile(rng):
        state = torch.load(rng, weights_only=True)
        torch.set_rng_state(state["cpu"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    return manifest["extra"]


def load_history(folder: str) -> dict[str, list[float]]:
    """Per-step series saved with the checkpoint (empty when it has none: written before they were)."""
    path = os.path.join(folder, "history.json")
    return json.load(open(path)) if os.path.isfile(path) else {}
