"""What the training loop reports besides the loss: timing, MFU, the issue's metric names, pictures,
alerts. One object per rank; only the logging rank (rank 0) owns a sink, but every rank times its own
regions and joins the one small all-reduce that turns per-rank combine times into the imbalance wait.

Metric names (a `/layer_{i}` suffix for per-layer series; the name alone summarises over layers):
- `train/loss`, `train/lr`, `train/grad_norm`, `perf/tokens_per_s`, `perf/step_time_s`,
  `perf/max_memory_gib` are the loop's legacy keys (`loss`, `lr`, ... kept as aliases) under their
  dashboard names; `perf/mfu` is :mod:`moe.train.mfu`'s.
- `perf/expert_compute_time_s`: expert compute (forward + backward) on the logging rank; with ep=1 the
  whole local dispatch (gather, experts, weighted scatter).
- `traffic/a2a_time_s`: dispatch + combine all-to-alls, forward + backward, on the logging rank
  (waiting for peers included: that is what the step pays). `traffic/a2a_gbps`: cross-rank bytes this
  rank sent in them (2 x (dispatch + combine bytes): the backward moves gradients of the same sizes)
  per second, in GB/s (1e9 bytes/s); null when nothing was timed.
- `moe/imbalance_wait_s`: see :func:`imbalance_wait`.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from moe.config import JobConfig
from moe.parallel.mesh import ParallelContext
from moe.train import plots
from moe.train.alerts import HealthMonitor
from moe.train.mfu import device_peak_flops, mfu, training_flops_per_token
from moe.train.sinks import Histogram, Image, MetricsSink
from moe.train.timing import DeviceClockTimer, RegionTimer

# Legacy metrics.jsonl keys and their dashboard names; both are written, to every sink.
ALIASES = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "aux_loss": "train/aux_loss",
    "tokens_per_s": "perf/tokens_per_s", "step_time_s": "perf/step_time_s",
    "max_memory_gib": "perf/max_memory_gib", "eval_loss": "eval/loss",
}
# Router metrics (per layer from the loop) summarised over layers by their mean: the losses are
# per-layer means already, and every layer routes the same number of assignments, so the mean
# dropped fraction is the fraction of all assignments dropped.
ROUTER_SUMMARY = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss", "z_loss",
                  "dropped_fraction")
TRAFFIC_ZERO = ("traffic/dispatch_bytes", "traffic/combine_bytes", "traffic/intra_node_bytes",
                "traffic/inter_node_bytes", "traffic/expected_bytes_uniform", "traffic/inter_node_bytes_from_routing")


def imbalance_wait(after_experts_RL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, (mean, max) over EP ranks of the time a rank waits for the most loaded one.

    `after_experts_RL[r, l]` is rank r's time in the all-to-alls that directly follow expert compute in
    layer l: the forward combine and the backward of the dispatch. Such an all-to-all cannot finish on
    any rank before the slowest rank (the one with the most tokens to compute) has joined it, so a
    rank's time in it is transfer plus waiting; the rank that arrived last waits least, and its time is
    the best available estimate of the transfer alone. Wait of rank r = t[r] - min over ranks of t.
    Barrier-free: it uses only times each rank measured anyway (CUDA events on GPU), gathered once per
    logged step. It is an estimate: it also counts skew from work before the experts (other layers,
    data loading), and the minimum rank still pays its own slack in the transfer."""
    wait_RL = after_experts_RL - after_experts_RL.min(0).values
    return wait_RL.mean(0), wait_RL.max(0).values


class Observability:
    def __init__(self, job: JobConfig, model: torch.nn.Module, ctx: ParallelContext, device: torch.device,
                 sink: MetricsSink | None, tokens_per_step: int) -> None:
        self.job, self.model, self.ctx, self.device, self.sink = job, model, ctx, device, sink
        self.tokens_per_step = tokens_per_step
        self.layers = sorted(model.moe_layers())
        # Every MoE layer of the model: with pipeline parallelism this rank holds only its stage's layers
        # (self.layers, what it times) but logs all of them (the loop reduces their metrics over pp).
        self.model_layers = list(range(job.model.num_dense_layers, job.model.num_layers))
        # Under train.cuda_graphs the MoE regions run inside a graph: they time themselves on the device.
        timer_cls = DeviceClockTimer if job.train.cuda_graphs else RegionTimer
        self.timer = timer_cls(device) if job.logger.timing else None
        for i, moe in model.moe_layers().items():
            moe.layer_id = i
            moe.timer = self.timer
            if hasattr(moe.dispatcher, "timer"):  # the all-to-all dispatcher times its own regions
                moe.dispatcher.timer = self.timer
        self.flops_per_token = training_flops_per_token(job.model, job.train.seq_len)
        self.peak_flops, peak_note = device_peak_flops(device, job.logger.peak_tflops)
        self.monitor = HealthMonitor(job.logger.alerts) if sink is not None else None
        if sink is not None:
            print(f"[metrics] perf/mfu: {'peak ' + peak_note if self.peak_flops else 'null: ' + peak_note}", flush=True)

    def start_step(self) -> None:
        if self.timer is not None:
            self.timer.reset()

    # ------------------------------------------------------------------ per step
    def step_metrics(self, metrics: dict[str, Any], step_time_s: float, log: bool) -> dict[str, Any]:
        """Metrics to add once the step's work is done (after the loop's end-of-step synchronise) and
        before evaluation (whose forward passes would add to the timers). Every rank calls it on the
        same steps: with `log` and ep > 1 it all-reduces the per-rank combine times over the EP group."""
        out: dict[str, Any] = {}
        for k in ROUTER_SUMMARY:
            values = [metrics[f"moe/{k}/layer_{i}"] for i in self.model_layers if f"moe/{k}/layer_{i}" in metrics]
            if values:
                out[f"moe/{k}"] = sum(values) / len(values)
        out["perf/mfu"] = mfu(self.flops_per_token, self.tokens_per_step, step_time_s, self.ctx.world_size,
                              self.peak_flops)
        if self.ctx.ep == 1:  # nothing crosses ranks: the traffic series are exact zeros, not missing
            for k in TRAFFIC_ZERO:
                out.setdefault(k, 0)
        if log and self.timer is not None:
            out.update(self._timing(metrics))
        return out

    def _timing(self, metrics: dict[str, Any]) -> dict[str, Any]:
        times = self.timer.collect()

        def both(region: str) -> float:
            fwd, bwd = times.get(region, (0.0, 0.0))
            return fwd + bwd

        out: dict[str, Any] = {}
        after_L = torch.zeros(len(self.layers), dtype=torch.float64)
        for j, i in enumerate(self.layers):
            out[f"perf/expert_compute_time_s/layer_{i}"] = both(f"experts/layer_{i}")
            out[f"traffic/a2a_time_s/layer_{i}"] = both(f"a2a_dispatch/layer_{i}") + both(f"a2a_combine/layer_{i}")
            after_L[j] = times.get(f"a2a_combine/layer_{i}", (0.0, 0.0))[0] + times.get(f"a2a_dispatch/layer_{i}", (0.0, 0.0))[1]
        out["perf/expert_compute_time_s"] = sum(out[f"perf/expert_compute_time_s/layer_{i}"] for i in self.layers)
        a2a = sum(out[f"traffic/a2a_time_s/layer_{i}"] for i in self.layers)
        out["traffic/a2a_time_s"] = a2a
        sent = 2 * (metrics.get("traffic/dispatch_bytes", 0) + metrics.get("traffic/combine_bytes", 0))
        out["traffic/a2a_gbps"] = sent / a2a / 1e9 if a2a > 0 else None
        wait_mean_L = wait_max_L = torch.zeros(len(self.layers), dtype=torch.float64)
        if self.ctx.ep > 1:
            # Each rank fills its own row; a sum all-reduce is then an all-gather of [ep, L].
            buf_RL = torch.zeros(self.ctx.ep, len(self.layers), dtype=torch.float64, device=self.device)
            buf_RL[self.ctx.ep_rank] = after_L.to(self.device)
            dist.all_reduce(buf_RL, group=self.ctx.group("ep"))
            wait_mean_L, wait_max_L = imbalance_wait(buf_RL.cpu())
        for j, i in enumerate(self.layers):
            out[f"moe/imbalance_wait_s/layer_{i}"] = wait_mean_L[j].item()
        out["moe/imbalance_wait_s"] = wait_mean_L.sum().item()
        out["moe/imbalance_wait_max_s"] = wait_max_L.sum().item()
        return out

    # ------------------------------------------------------------------ logging rank
    def publish(self, metrics: dict[str, Any], step: int, loads: dict[int, torch.Tensor], log: bool) -> None:
        """Logging rank only (a no-op elsewhere): alerts every step, metrics on log steps, pictures every
        `logger.plot_every` steps. `loads` are the step's global tokens per expert, per layer."""
        if self.sink is None:
            return
        for k, alias in ALIASES.items():
            if k in metrics:
                metrics[alias] = metrics[k]
        metrics.setdefault("perf/max_memory_gib", None)  # CPU: torch does not track host allocations
        for alert in self.monitor.check(loads, step):
            print(alert.line(), flush=True)  # the driver streams worker stdout
            self.sink.alert(alert)
        if log:
            self.sink.log(metrics, step)
        every = self.job.logger.plot_every
        if every > 0 and loads and (step % every == 0 or step + 1 == self.job.train.steps):
            self.sink.log_media(self._media(metrics, step, loads), step)

    def _media(self, metrics: dict[str, Any], step: int, loads: dict[int, torch.Tensor]) -> dict[str, Any]:
        root = os.path.join(self.job.run_dir, "plots")
        media: dict[str, Any] = {}
        path = plots.expert_load_heatmap(loads, os.path.join(root, f"tokens_per_expert_step{step:06d}.png"), step)
        if path:
            media["moe/tokens_per_expert_heatmap"] = Image(path)
        matrices = [metrics[f"traffic/matrix/layer_{i}"] for i in self.layers if f"traffic/matrix/layer_{i}" in metrics]
        if matrices:
            matrix_RR = torch.tensor(matrices).sum(0)
            path = plots.traffic_heatmap(matrix_RR, os.path.join(root, f"traffic_matrix_step{step:06d}.png"), step)
            if path:
                media["traffic/matrix_heatmap"] = Image(path)
        media["moe/expert_load_hist"] = Histogram(torch.cat([loads[i].flatten() for i in sorted(loads)]).tolist())
        return media
