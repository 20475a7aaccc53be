"""One training step under pipeline parallelism, and what the loop needs around it.

`PipelineRunner` wraps this rank's `PipelineStageModel` in a `torch.distributed.pipelining` stage and a
1F1B schedule over the `pp` group: the step's micro-batches are the loop's gradient-accumulation
micro-batches (`train.micro_batch_size` sequences each), so the same sequences meet the same weights as
in one process. The loss function returns `ce / accum` and the schedule does not rescale gradients
(`scale_grads=False`); with the aux-loss injection (moe.parallel.pipeline) the gradients are those of
the single-process `((ce + aux) / accum).backward()` summed over micro-batches.

With tensor parallelism (moe.parallel.tensor_parallel) each stage's module is sharded over its own tp
group after the stage cut (the plan skips the embedding, norm and head a stage does not hold). Between
blocks, and so between stages, a rank's residual stream is its plain [mbs, S/tp, D] slice of every
sequence: the stages send and receive that slice (`hidden_shape_between_stages`), and a rank's pp group
joins the same (dp, tp) position of every stage, so each slice reaches the rank that continues it. The
last stage's head gathers the logits, so every tp rank of it computes the same loss; the loop reduces
losses and metrics over dp and pp only, never over tp. Each tp rank injects its layer's (whole-sequence)
balancing loss with the same 1 / accum: its router gradient is its own tokens' share, summed over tp by
moe.parallel.grads as without pipelining.

Metrics leave each stage through fixed-size sums over the `pp` group, so they cannot hang on a stage
that owns no MoE layer (it contributes zeros): `router_sums_all_layers` gives every rank the same keys
for the loop's packed all-reduce, `gather_loads` one [num_moe_layers, 2E] table of expert loads and
biases, `gather_stage_metrics` one vector of traffic, timing and routing-spread values. Each layer is
owned by one stage, so a sum over pp is a gather. Every rank ends with the global values; rank 0 logs.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from moe.config import JobConfig
from moe.parallel import inflight
from moe.parallel.inflight import collective
from moe.parallel.mesh import ParallelContext
from moe.parallel.pipeline import ROUTER_KEYS, PipelineStageModel, build_stage_model

PP_SUMMED = ("traffic/dispatch_bytes", "traffic/combine_bytes", "traffic/intra_node_bytes", "traffic/inter_node_bytes",
             "traffic/expected_bytes_uniform", "traffic/inter_node_bytes_from_routing", "perf/expert_compute_time_s",
             "traffic/a2a_time_s", "moe/imbalance_wait_s", "moe/imbalance_wait_max_s")
"""Metrics that are sums over MoE layers (the totals) or per layer (`/layer_{i}`): this rank's bytes and
times in its own stage's layers; over pp they add up to the same position's ranks in every stage."""
PP_MEAN_OF_LAYERS = ("moe/ranks_per_token_mean", "moe/nodes_per_token_mean")
PP_MAX = ("moe/ranks_per_token_max", "moe/nodes_per_token_max")


def _is_communication_error(e: BaseException) -> bool:
    """gloo reports a lost peer or a timeout as a plain RuntimeError; newer backends raise DistError."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in ("gloo", "NCCL", "Connection closed", "Timed out"))


def pp_rank(ctx: ParallelContext) -> int:
    """This rank's stage: ranks are laid out pp outermost (moe/parallel/mesh.py)."""
    return ctx.rank // (ctx.dp * ctx.tp)


def hidden_shape_between_stages(job: JobConfig, ctx: ParallelContext) -> tuple[int, int, int]:
    """[mbs, S/tp, D]: what one micro-batch's residual stream is on each rank between blocks. Under tp
    (sequence parallel) it is this rank's plain slice of every sequence, and the pp group joins the same
    tp position of every stage, so each rank sends and receives its own slice."""
    t = job.train
    return t.micro_batch_size, t.seq_len // ctx.tp, job.model.hidden_size


def stage_model_for(model: torch.nn.Module, job: JobConfig, ctx: ParallelContext) -> PipelineStageModel:
    return build_stage_model(model, pp_rank(ctx), ctx.pp, job.train.seq_len)


class PipelineRunner:
    def __init__(self, stage_model: PipelineStageModel, job: JobConfig, ctx: ParallelContext,
                 device: torch.device, accum: int,
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        # launcher/config.py refuses this first; this says why should a job arrive here some other way.
        if accum < ctx.pp:
            raise ValueError(f"pipeline needs at least pp={ctx.pp} micro-batches per step, got {accum}")
        t, m = job.train, job.model
        self.model, self.job, self.ctx, self.device, self.accum = stage_model, job, ctx, device, accum
        self.lm_loss = loss_fn
        stage_model.autocast = autocast
        stage_model.aux_grad_scale = 1.0 / accum
        self.moe_layer_ids = list(range(m.num_dense_layers, m.num_layers))
        self.num_experts = m.moe.num_experts
        mbs, S, D = t.micro_batch_size, t.seq_len, m.hidden_size
        # Static shapes (meta tensors: nothing allocated): without them the stage infers shapes by running
        # its forward on dummy data, which would run the MoE all-to-alls and count dummy tokens.
        hidden_dtype = torch.float32  # the residual stream stays in the fp32 parameter dtype under autocast
        meta = torch.device("meta")
        hidden_shape = hidden_shape_between_stages(job, ctx)
        # requires_grad on the float metas: the stage derives from it which gradients travel back.
        inp = (torch.empty(mbs, S, dtype=torch.int64, device=meta) if stage_model.is_first
               else torch.empty(hidden_shape, dtype=hidden_dtype, device=meta, requires_grad=True))
        # The last stage's logits are whole on every tp rank (the head gathers them over the vocabulary).
        out = (torch.empty(mbs, S, m.vocab_size, dtype=torch.float32, device=meta, requires_grad=True)
               if stage_model.is_last
               else torch.empty(hidden_shape, dtype=hidden_dtype, device=meta, requires_grad=True))
        self.stage = PipelineStage(stage_model, pp_rank(ctx), ctx.pp, device, input_args=inp, output_args=out,
                                   group=ctx.group("pp"))
        self.schedule = Schedule1F1B(self.stage, n_microbatches=accum, loss_fn=self._loss, scale_grads=False)
        # Do not merge and keep the last stage's logits (torch versions that know the argument).
        self._step_kwargs = ({"return_outputs": False}
                             if "return_outputs" in inspect.signature(self.schedule.step).parameters else {})
        self.ce_sum = torch.zeros((), device=device)

    def _loss(self, logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        ce = self.lm_loss(logits_BSV, targets_BS)
        self.ce_sum += ce.detach()
        return ce / self.accum  # the single-process root: ((ce + aux) / accum).backward()

    # ------------------------------------------------------------------ training step
    def step(self, dataset, data_step: int, batch_rank: int, local_batch: int
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of this rank's local batch; gradients are left in `.grad` as after the
        single-process micro-batch loop. Returns (ce summed over micro-batches: 0 except on the last
        stage, this stage's balancing losses summed, router metric sums for every MoE layer)."""
        m = self.model
        m.reset_stats()
        self.ce_sum = torch.zeros((), device=self.device)
        args, target = (), None
        if m.is_first or m.is_last:  # middle stages read nothing: their inputs arrive from the previous stage
            start = batch_rank * local_batch
            inputs, targets = dataset.batch(data_step, range(start, start + local_batch))
            args = (inputs.to(self.device),) if m.is_first else ()
            target = targets.to(self.device) if m.is_last else None
        # The schedule splits the local batch into `accum` chunks of micro_batch_size sequences in order:
        # micro-batch j holds sequences [j * mbs, (j+1) * mbs), as in the single-process loop.
        started = time.monotonic()
        try:
            self.schedule.step(*args, target=target, **self._step_kwargs)
        except RuntimeError as e:
            # The schedule's own send/recv are not marked in flight (the MoE all-to-alls inside it are):
            # when a communication error escapes with nothing marked, name the pipeline's send/recv as
            # the collective this rank failed in (moe/train/worker.py reports it with the group's ranks).
            if inflight.current() is None and _is_communication_error(e):
                what = f"pipeline schedule (1F1B, {self.accum} micro-batches), {time.monotonic() - started:.1f} s in"
                with collective("pp", "send/recv", what):
                    raise
            raise
        return self.ce_sum, m.aux_sum.to(self.device), self.router_sums_all_layers()

    def router_sums_all_layers(self) -> dict[str, torch.Tensor]:
        """The same keys on every stage (every MoE layer of the model x ROUTER_KEYS), zeros for layers
        this stage does not own, so the loop's packed all-reduce has one size everywhere."""
        sums = self.model.router_sums
        unknown = sorted(k for k in sums if k.split("/")[1] not in ROUTER_KEYS)
        if unknown:
            raise RuntimeError(f"MoE metrics {unknown} are not in moe.parallel.pipeline.ROUTER_KEYS; add them there "
                               "so every pipeline stage reduces the same table")
        zero = torch.zeros((), device=self.device)
        return {f"moe/{k}/layer_{i}": sums.get(f"moe/{k}/layer_{i}", zero).to(self.device)
                for i in self.moe_layer_ids for k in ROUTER_KEYS}

    # ------------------------------------------------------------------ metrics of every stage
    def gather_loads(self, loads: dict[int, torch.Tensor], biases: dict[int, torch.Tensor]
                     ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Global tokens per expert and expert biases of every MoE layer, on every rank: one fixed-size
        all-reduce over pp of [num_moe_layers, 2E] (float64 holds the counts exactly)."""
        E = self.num_experts
        table_LC = torch.zeros(len(self.moe_layer_ids), 2 * E, dtype=torch.float64, device=self.device)
        for row, i in enumerate(self.moe_layer_ids):
            if i in loads:
                table_LC[row, :E] = loads[i].to(self.device, torch.float64)
                table_LC[row, E:] = biases[i].to(self.device, torch.float64)
        with collective("pp", "all_reduce", "expert loads and biases of every stage"):
            dist.all_reduce(table_LC, group=self.ctx.group("pp"))
        table_LC = table_LC.cpu()
        bias_dtype = next(iter(biases.values())).dtype if biases else torch.float32
        return ({i: table_LC[row, :E].to(torch.int64) for row, i in enumerate(self.moe_layer_ids)},
                {i: table_LC[row, E:].to(bias_dtype) for row, i in enumerate(self.moe_layer_ids)})

    def gather_stage_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Traffic, timing and routing-spread metrics of every stage for the logging rank (the router
        losses and expert loads went through the loop's reductions already). One all-reduce over pp of a
        fixed-size vector: per name a (value, present) pair, for the total and for each MoE layer, so a
        stage without MoE layers (or a step without timing) contributes zeros and nothing hangs.
        Totals add up over stages (each stage's are sums over its layers); means of per-layer means
        are weighted by layer count; maxima take the max."""
        L, E = self.moe_layer_ids, self.ctx.ep
        n_local = float(len(self.model.moe_layers()))
        slots: list[tuple[str, int, str]] = []  # (key, width, how: sum | mean | max)
        for name in PP_SUMMED:
            slots.append((name, 1, "sum"))
            slots += [(f"{name}/layer_{i}", 1, "sum") for i in L]
        slots += [(f"traffic/matrix/layer_{i}", E * E, "sum") for i in L]
        slots += [(k, 1, "mean") for k in PP_MEAN_OF_LAYERS] + [(k, 1, "max") for k in PP_MAX]
        width = sum(w + 1 for _, w, _ in slots)  # + 1: the present flag
        mine = torch.zeros(width, dtype=torch.float64)
        pos = 0
        for key, w, how in slots:
            if key in metrics and metrics[key] is not None:
                v = torch.as_tensor(metrics[key], dtype=torch.float64).flatten()
                mine[pos:pos + w] = v * n_local if how == "mean" else v
                mine[pos + w] = n_local if how == "mean" else 1.0
            pos += w + 1
        # Each stage fills its own row; a sum all-reduce is then a gather of [pp, width].
        all_SW = torch.zeros(self.ctx.pp, width, dtype=torch.float64, device=self.device)
        all_SW[pp_rank(self.ctx)] = mine.to(self.device)
        with collective("pp", "all_reduce", "traffic and timing metrics of every stage"):
            dist.all_reduce(all_SW, group=self.ctx.group("pp"))
        all_SW = all_SW.cpu()
        out: dict[str, Any] = {}
        pos = 0
        for key, w, how in slots:
            vals_SW, flag_S = all_SW[:, pos:pos + w], all_SW[:, pos + w]
            pos += w + 1
            if flag_S.sum() == 0:
                continue
            if how == "sum":
                v = vals_SW.sum(0)
                out[key] = v.view(E, E).to(torch.int64).tolist() if w > 1 else v.item()
            elif how == "mean":
                out[key] = (vals_SW[:, 0].sum() / flag_S.sum()).item()
            else:
                out[key] = vals_SW[flag_S > 0, 0].max().item()
        for key, v in out.items():  # byte and rank counts stay integers, as one process logs them
            if isinstance(v, float) and ("bytes" in key and "expected" not in key or key in PP_MAX):
                out[key] = int(v)
        if "traffic/a2a_time_s" in out:  # this rank's GB/s over every stage's all-to-alls, as observability.py
            a2a = out["traffic/a2a_time_s"]
            sent = 2 * (out.get("traffic/dispatch_bytes", 0) + out.get("traffic/combine_bytes", 0))
            out["traffic/a2a_gbps"] = sent / a2a / 1e9 if a2a > 0 else None
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset, job: JobConfig, step: int) -> float:
        """The loop's `evaluate` through the stages: forward only, one micro-batch at a time, hidden states
        passed on with blocking send/recv over pp (each rank's [mbs, S/tp, D] slice under tp); the last
        stage's loss is summed over dp and pp (its tp ranks hold the same value: not over tp)."""
        m, t, ctx = self.model, job.train, self.ctx
        m.eval()
        group = ctx.group("pp")
        me = pp_rank(ctx)
        prev_rank, next_rank = (dist.get_global_rank(group, s) if 0 <= s < ctx.pp else None
                                for s in (me - 1, me + 1))
        total = torch.zeros((), device=self.device)
        shape = hidden_shape_between_stages(job, ctx)
        for b in range(t.eval_batches):
            start = (b * ctx.dp + ctx.dp_rank) * t.micro_batch_size
            inputs, targets = dataset.batch(step, range(start, start + t.micro_batch_size), split="val")
            if m.is_first:
                h = inputs.to(self.device)
            else:
                h = torch.empty(shape, dtype=torch.float32, device=self.device)
                with collective("pp", "recv", f"evaluation activations, batch {b}"):
                    dist.recv(h, src=prev_rank, group=group)
            out = m(h)
            if m.is_last:
                total += self.lm_loss(out, targets.to(self.device))
            else:
                with collective("pp", "send", f"evaluation activations, batch {b}"):
                    dist.send(out.contiguous(), dst=next_rank, group=group)
        for moe in m.moe_layers().values():
            moe.tokens_per_expert_acc.zero_()  # evaluation tokens are not training load
            if hasattr(moe.dispatcher, "reset_stats"):
                moe.dispatcher.reset_stats()
        m.train()
        for name in ("dp", "pp"):
            g = ctx.group(name)
            if g is not None and len(ctx.group_ranks(name)) > 1:
                with collective(name, "all_reduce", "evaluation loss"):
                    dist.all_reduce(total, group=g)
        return (total / (max(t.eval_batches, 1) * ctx.dp)).item()

