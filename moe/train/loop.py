"""The training loop: micro-batches with gradient accumulation, clipping, AdamW, bias updates,
evaluation, metrics. Runs inside one worker; the launcher decides where."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from moe.config import JobConfig
from moe.data import build_dataset
from moe.model.experts import resolve_backend
from moe.model.router import update_expert_bias
from moe.model.transformer import Transformer, build_model, count_params
from moe.parallel.expert_parallel import apply_expert_parallel, tie_router_groups_to_topology
from moe.parallel.grads import clip_gradients, global_grad_norm, reduce_gradients
from moe.parallel.inflight import collective
from moe.parallel.mesh import ParallelContext
from moe.train.load_metrics import model_load_metrics, to_cpu
from moe.train.cuda_graph import GraphedMicroStep, MicroStep
from moe.train.determinism import deterministic_mode
from moe.train.observability import Observability
from moe.train import checkpoint, faults, resume
from moe.train.optim import build_optimizer, lr_at, set_lr
from moe.train.traffic import routing_spread_metrics, traffic_metrics
from moe.train.sinks import JsonlSink, MetricsSink, MultiSink, WandbSink

Report = Callable[[dict[str, Any]], None]


class NonFiniteError(RuntimeError):
    """Raised before the optimizer update when the loss or gradient norm is not finite."""


def pick_device(use_gpu: bool) -> torch.device:
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.use_gpu=true but this worker sees no CUDA device; set cluster.use_gpu=false")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_for(dtype: str, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast unless fp32 is asked for (or `auto` on CPU). `cache=False` for a region captured
    in a CUDA graph, as PyTorch's graph notes ask: the cast weights must not outlive the capture."""
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


def first_nonfinite_grad(model: torch.nn.Module) -> str | None:
    for name, p in model.named_parameters():
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # tp: this rank's shard, no collective
        if g is not None and not torch.isfinite(g).all():
            return name
    return None


def all_reduce_(t: torch.Tensor, ctx: ParallelContext, group: str, op=None) -> torch.Tensor:
    """In-place all-reduce over a named group; a no-op where the group has one member."""
    import torch.distributed as dist

    g = ctx.group(group)
    if g is not None and len(ctx.group_ranks(group)) > 1:
        with collective(group, "all_reduce", "step metrics"):
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=g)
    return t


def build_sinks(job: JobConfig, model_name: str, wandb_run_id: str | None = None) -> MetricsSink:
    sinks: list[MetricsSink] = [JsonlSink(job.run_dir)]
    w = job.logger.wandb
    if w.mode != "disabled":
        # Runs of one model and layout share a group; the name adds the run dir (Hydra's timestamp).
        group = w.group or f"{model_name}-dp{job.parallel.dp}-ep{job.parallel.ep}"
        name = w.name or f"{group}-{os.path.basename(os.path.normpath(os.path.abspath(job.run_dir)))}"
        sinks.append(WandbSink(job.run_dir, w.mode, w.project, name, group, w.entity, dataclasses.asdict(job),
                               wandb_run_id))
    return MultiSink(sinks)


def micro_step_fn(model: Transformer, job: JobConfig, device: torch.device, accum: int) -> MicroStep:
    """One micro-batch's forward and backward on device tensors, gradients scaled for a mean over
    `accum` micro-batches. Returns the LM loss, the balancing loss and the router metrics, detached:
    plain tensors eager, the graph's outputs under train.cuda_graphs."""
    graphed = job.train.cuda_graphs

    def run(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with autocast_for(job.train.dtype, device, cache=not graphed):
            ce = lm_loss(model(inputs), targets)
            aux = model.aux_loss().to(device)
        ((ce + aux) / accum).backward()
        metrics = {f"moe/{k}/layer_{i}": v.detach().float()
                   for i, moe in model.moe_layers().items() for k, v in moe.metrics.items()}
        return ce.detach(), aux.detach(), metrics

    return run


def forward_backward(step_fn: MicroStep, dataset, job: JobConfig, device: torch.device, data_step: int,
                     first_row: int, accum: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One step's micro-batches on this rank (rows `first_row` onwards of the global batch) through
    `step_fn` (`micro_step_fn`, or its CUDA graph), gradients accumulated as the mean over them.
    Returns the summed LM loss, balancing loss and router metrics."""
    t = job.train
    ce_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    router_sums: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        start = first_row + micro * t.micro_batch_size
        inputs, targets = dataset.batch(data_step, range(start, start + t.micro_batch_size))
        # A graph's outputs are overwritten by its next replay: they are summed here, before it.
        ce, aux, metrics = step_fn(inputs.to(device), targets.to(device))
        ce_sum += ce
        aux_sum += aux
        for key, v in metrics.items():
            router_sums[key] = router_sums.get(key, 0) + v
    return ce_sum, aux_sum, router_sums


@torch.no_grad()
def evaluate(model: Transformer, dataset, job: JobConfig, step: int, device, ctx: ParallelContext) -> float:
    """Mean loss over `eval_batches` held-out micro-batches per data-parallel rank."""
    model.eval()
    t = job.train
    total = torch.zeros((), device=device)
    for b in range(t.eval_batches):
        start = (b * ctx.dp + ctx.dp_rank) * t.micro_batch_size
        inputs, targets = dataset.batch(step, range(start, start + t.micro_batch_size), split="val")
        with autocast_for(t.dtype, device):
            total += lm_loss(model(inputs.to(device)), targets.to(device))
    for moe in model.moe_layers().values():
        moe.tokens_per_expert_acc.zero_()  # evaluation tokens are not training load
        if hasattr(moe.dispatcher, "reset_stats"):
            moe.dispatcher.reset_stats()
    model.train()
    return (all_reduce_(total, ctx, "dp") / (max(t.eval_batches, 1) * ctx.dp)).item()


def train(job: JobConfig, report: Report | None = None, ctx: ParallelContext | None = None) -> dict[str, Any]:
    """Train `job` on this rank and return the summary. `ctx` places the rank in the parallel layout
    (its share of each global batch, its experts, its groups); None means one process."""
    with deterministic_mode(job.train.deterministic):
        return _train(job, report, ctx or ParallelContext())


def _train(job: JobConfig, report: Report | None, ctx: ParallelContext) -> dict[str, Any]:
    t = job.train
    device = pick_device(job.cluster.use_gpu)
    torch.manual_seed(t.seed)
    model = build_model(job.model, t.seed, device)
    total_params, active_params = count_params(model, job.model)
    if ctx.pp > 1:  # keep this stage's layers (same parameter names); see moe/train/pipeline_step.py
        from moe.train.pipeline_step import PipelineRunner, stage_model_for

        model = stage_model_for(model, job, ctx)
    backend = resolve_backend(job.model.moe.backend, device)
    for moe in model.moe_layers().values():
        moe.experts.backend = backend
        moe.force_balanced_routing = t.force_balanced_routing
        moe.router.global_group = ctx.group("routing") if ctx.dp * ctx.tp > 1 else None
    if ctx.ep > 1:
        apply_expert_parallel(model, ctx.group("ep"), ctx.ep, ctx.ep_rank, ctx.node_of_rank, ctx.group_ranks("ep"),
                              comm=job.parallel.ep_comm, timeout_s=job.parallel.timeout_s)
    # Dense part sharded over tp, sequence-parallel residual stream (moe/parallel/tensor_parallel.py). After
    # the stage cut under pp: each stage shards only what it holds, over its own tp group.
    if ctx.tp > 1:
        from moe.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, ctx.mesh["tp"])
    if t.compile:  # in place: the same parameters and names for the optimizer and checkpoints
        from moe.model.compile import apply_compile

        apply_compile(model)
    tie_router_groups_to_topology(model, job.model.moe.router.group_by, ctx.ep,
                                  [ctx.node_of_rank[r] for r in ctx.group_ranks("ep")])
    batch_rank, batch_ranks = ctx.dp_rank, ctx.dp
    dataset = build_dataset(job.data, t.seq_len, t.seed, job.model.vocab_size)
    optimizer = build_optimizer(model, t)
    ckpt_root = os.path.join(job.run_dir, "checkpoints")
    resumed = resume.restore(job, model, optimizer, ctx, ckpt_root)  # weights, moments, RNG, data position
    start_step = resumed.start_step
    is_logger = ctx.rank == 0
    sink = build_sinks(job, job.model.name, resumed.wandb_run_id) if is_logger else None

    accum = t.global_batch_size // (t.micro_batch_size * batch_ranks)
    local_batch = t.micro_batch_size * accum
    pipe = (PipelineRunner(model, job, ctx, device, accum, lambda: autocast_for(t.dtype, device), lm_loss)
            if ctx.pp > 1 else None)
    tokens_per_step = t.global_batch_size * t.seq_len
    obs = Observability(job, model, ctx, device, sink, tokens_per_step)
    step_fn = micro_step_fn(model, job, device, accum)
    if t.cuda_graphs:  # captured at the first micro-batch (moe/train/cuda_graph.py)
        step_fn = GraphedMicroStep(model, step_fn, device, after_warmup=obs.start_step)  # warm-up is not timed
    rate = job.model.moe.router.bias_update_rate if job.model.moe.router.use_expert_bias else 0.0
    history: list[dict[str, Any]] = []
    eval_loss = None
    started = time.perf_counter()

    for step in range(start_step, t.steps):
        faults.point("step_start", step)  # test-only hook; returns at once unless MOE_TEST_FAULT is set
        data_step = resumed.data_step + step - start_step
        step_start = time.perf_counter()
        obs.start_step()
        lr = lr_at(step, t)
        set_lr(optimizer, lr)
        if pipe is not None:  # the 1F1B schedule runs the same micro-batches through the stages
            ce_sum, aux_sum, router_sums = pipe.step(dataset, data_step, batch_rank, local_batch)
        else:
            ce_sum, aux_sum, router_sums = forward_backward(step_fn, dataset, job, device, data_step,
                                                            batch_rank * local_batch, accum)

        reduce_gradients(model, ctx)
        grad_norm = global_grad_norm(model, ctx)
        clip_gradients(model, grad_norm, t.grad_clip)
        # One all-reduce for every logged per-rank mean: the LM loss, the balancing loss, router losses.
        keys = sorted(router_sums)
        packed = torch.stack([ce_sum, aux_sum, *(router_sums[k].to(device) for k in keys)])
        # Over pp too: the loss lives on the last stage, each layer's router sums on its own stage. Never
        # over tp: every tp rank holds the whole micro-batches' loss and router sums (logits gathered; router
        # losses and drops over whole sequences, moe/model/sharded_balancing.py): a sum would count them tp times.
        packed = all_reduce_(all_reduce_(packed, ctx, "dp"), ctx, "pp") / (accum * ctx.dp)
        loss = packed[0].item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            where = first_nonfinite_grad(model)
            raise NonFiniteError(
                f"non-finite training signal at step {step}: loss={loss}, grad_norm={grad_norm}"
                + (f", first non-finite gradient in {where}" if where else "")
                + "; the optimizer update was skipped and the weights are those of the last good step"
            )
        faults.point("before_optimizer")
        optimizer.step()
        # A CUDA graph accumulates into the gradient tensors it was captured with: zero them, keep them.
        optimizer.zero_grad(set_to_none=not t.cuda_graphs)

        for moe in model.moe_layers().values():
            all_reduce_(moe.tokens_per_expert_acc, ctx, "routing")  # global load: identical biases everywhere
        # Global tokens per expert on the host, kept for the pictures and alerts after the reset below.
        loads = to_cpu({i: m.tokens_per_expert_acc for i, m in model.moe_layers().items()})
        biases = {i: m.router.expert_bias for i, m in model.moe_layers().items()}
        if pipe is not None:  # every stage's layers, for the logging rank
            loads, biases = pipe.gather_loads(loads, biases)
        metrics: dict[str, Any] = model_load_metrics(loads, biases, ctx.ep)
        if ctx.ep > 1:
            metrics.update(traffic_metrics(model, ctx, tokens_per_rank=local_batch * t.seq_len // ctx.tp,
                                           top_k=job.model.moe.top_k, hidden=job.model.hidden_size))
            metrics.update(routing_spread_metrics(model))
        for moe in model.moe_layers().values():
            if rate > 0:
                update_expert_bias(moe.router.expert_bias, moe.tokens_per_expert_acc, rate)
            moe.tokens_per_expert_acc.zero_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - step_start
        metrics.update({
            "loss": loss, "aux_loss": packed[1].item(), "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
        })
        metrics.update(zip(keys, packed[2:].tolist()))
        should_log = step % t.log_every == 0 or step + 1 == t.steps
        metrics.update(obs.step_metrics(metrics, step_time, should_log))
        if pipe is not None:  # traffic, timing and spread of the other stages' layers
            metrics.update(pipe.gather_stage_metrics(metrics))
        if t.eval_every > 0 and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
            eval_loss = (evaluate(model, dataset, job, 0, device, ctx) if pipe is None  # same held-out windows
                         else pipe.evaluate(dataset, job, 0))
            metrics["eval_loss"] = eval_loss
        if device.type == "cuda":
            metrics["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        history.append({"step": step, "loss": loss, "grad_norm": grad_norm, "aux_loss": metrics["aux_loss"],
                        "tokens_per_s": metrics["tokens_per_s"]})
        obs.publish(metrics, step, loads, should_log)  # rank 0: alerts, sinks, pictures
        if report is not None and is_logger:
            report({"step": step, "loss": loss, "tokens_per_s": metrics["tokens_per_s"], "steps": t.steps})
        if t.checkpoint_every > 0 and ((step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps):
            extra = resume.checkpoint_extra(step, data_step + 1, job, getattr(sink, "wandb_run_id", None))
            checkpoint.save(ckpt_root, step, model, optimizer, ctx, extra, t.keep_checkpoints,
                            resume.history_to_save(resumed, history))

    wall = time.perf_counter() - started
    # losses / grad_norms / aux_losses cover every step from `losses_from_step` (0 unless a checkpoint
    # lacked its history): the steps before `start_step` come from the checkpoint this attempt resumed.
    series = resume.stitched(resumed, history)
    summary = {
        "model": job.model.name, "steps": t.steps, "start_step": start_step, "resumed_from": resumed.folder,
        "first_loss": series["losses"][0] if series["losses"] else None,
        "last_loss": series["losses"][-1] if series["losses"] else None, "eval_loss": eval_loss,
        "params_total": total_params, "params_active": active_params, "wall_time_s": wall,
        "tokens_per_s": tokens_per_step * len(history) / wall if wall > 0 else None,  # this attempt's steps
        # Steady state: the median step after the first three (allocator and autotuning warm-up).
        "median_tokens_per_s": statistics.median(h["tokens_per_s"] for h in history[3:] or history) if history else None,
        **series, "world_size": ctx.world_size, "device": str(device), "expert_backend": backend,
    }
    if sink is not None:
        sink.close()
        with open(os.path.join(job.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
