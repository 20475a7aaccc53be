"""CUDA graphs for the training step (`train.cuda_graphs`): one micro-batch's forward and backward is
captured once and replayed for every micro-batch after.

Why: at small batches the step is bound by the host, not the GPU. The README's default batch on an
H200 ran 35 ms of GPU kernels in a 155-170 ms step, about 5,400 launches, each paying Python, the
autograd engine and Triton's dispatch. A replay launches the whole micro-batch with one call.

How, following the whole-network capture of PyTorch's CUDA graph notes:
- The micro-batch's tokens and targets go through static device buffers: each call copies its
  batch in, then replays.
- Gradients accumulate in place into `.grad` tensors that exist before the capture. The trainer
  zeroes them between steps instead of freeing them (`zero_grad(set_to_none=False)`), so the
  addresses baked into the graph stay valid.
- Before capturing, `warmup` eager micro-batches run on a side stream. Triton autotunes and
  compiles there, cuBLAS picks its algorithms, and torch.compile (if on) compiles. Their
  gradients and expert-load counts are then undone, so the warm-up leaves no trace in training.
- The outputs are tensors that the graph owns: the LM loss, the balancing loss, and the MoE
  layers' router metrics. The next replay overwrites them, so callers read them before the next
  call, as `moe.train.loop.forward_backward` does.

What must hold inside the captured region: no host sync (dropless routing; the Triton and
grouped_mm backends), the same shapes every micro-batch, and one process (the configuration check
in launcher/config.py refuses the rest). The MoE layers' region timers read the GPU's clock from
kernels captured with the rest (`moe.train.timing.DeviceClockTimer`), so the timings are still
reported.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# (inputs, targets) -> (LM loss, balancing loss, router metrics by name), all detached.
MicroStep = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


class CudaGraphCaptureError(RuntimeError):
    """The micro-batch could not be captured. A restart would meet the same op again, so the launcher
    does not retry it (launcher/supervisor.py)."""


def warm_up_leaving_no_trace(model: torch.nn.Module, run: Callable[[], object], times: int) -> None:
    """Call `run` (a micro-batch's forward and backward) `times` times, then put the model's
    gradients and buffers (the MoE layers' expert-load counters) back to what they were. A gradient
    that was None becomes zeros instead: the capture that follows must find a tensor to accumulate
    into. A parameter the warm-up gave no gradient keeps None (the graph gives it none either)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads_before = [None if p.grad is None else p.grad.clone() for p in params]
    buffers = list(model.buffers())
    buffers_before = [b.clone() for b in buffers]
    for _ in range(times):
        run()
    with torch.no_grad():
        for p, before in zip(params, grads_before):
            if p.grad is None:
                continue
            if before is None:
                p.grad.zero_()
            else:
                p.grad.copy_(before)
        for b, before in zip(buffers, buffers_before):
            b.copy_(before)


class GraphedMicroStep:
    """`micro_step(inputs, targets)`, run through a CUDA graph.

    `micro_step` runs the forward and the backward of one micro-batch on device tensors and returns
    its detached results: these become the graph's outputs, which every replay rewrites (Python
    state set inside the step, such as a layer's `metrics` attribute, is set once, at the capture).
    The graph is captured at the first call, from that call's shapes; later calls must bring the
    same shapes and dtypes.
    """

    def __init__(self, model: torch.nn.Module, micro_step: MicroStep, device: torch.device, warmup: int = 2,
                 after_warmup: Callable[[], None] | None = None) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model, self.micro_step, self.device, self.warmup = model, micro_step, device, warmup
        self.after_warmup = after_warmup
        """Called once the warm-up is undone (the trainer resets its step timers there)."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self.graph is None:
            self._capture(inputs, targets)
        elif inputs.shape != self.inputs.shape or targets.shape != self.targets.shape:
            raise ValueError(f"train.cuda_graphs: micro-batch of shape {tuple(inputs.shape)} after capturing "
                             f"{tuple(self.inputs.shape)}; every micro-batch must have the same shape")
        self._load(inputs, targets)
        self.graph.replay()
        return self.outputs

    def _load(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """The micro-batch into the buffers the graph reads (stream-ordered before the replay)."""
        self.inputs.copy_(inputs, non_blocking=True)
        self.targets.copy_(targets, non_blocking=True)

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs = torch.empty(inputs.shape, dtype=inputs.dtype, device=self.device)
        self.targets = torch.empty(targets.shape, dtype=targets.dtype, device=self.device)
        self._load(inputs, targets)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            warm_up_leaving_no_trace(self.model, lambda: self.micro_step(self.inputs, self.targets), self.warmup)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.after_warmup is not None:
            self.after_warmup()
        torch.cuda.synchronize(self.device)

        graph = torch.cuda.CUDAGraph()
        try:
            # On the warm-up's stream: the parameters' gradient accumulators, made by the warm-up's
            # backward, then run on the stream they were made on (autograd warns, and may sync, else).
            with torch.cuda.graph(graph, stream=side):
                self.outputs = self.micro_step(self.inputs, self.targets)
        except RuntimeError as e:
            raise CudaGraphCaptureError(
                "train.cuda_graphs: capturing the micro-batch failed. Usually an op in the forward or "
                "backward waits for the host (a .item(), a data-dependent shape), which a graph cannot "
                f"hold; run with train.cuda_graphs=false. Cause: {e}") from e
        self.graph = graph
