"""Per-region timers for the MoE hot path (all-to-alls, expert compute), forward and backward.

A region is timed by two identity autograd marks placed around it: ``x = span.enter(x)`` before and
``y = span.exit(y)`` after. In the forward pass the marks record the start and end; in the backward
pass gradients meet them in reverse order, so ``exit`` records the start of the region's backward and
``enter`` its end. One span thus measures the forward and the backward of the same region.

On CUDA the marks record ``torch.cuda.Event``s on the current stream and never synchronise: the
events are read by :meth:`RegionTimer.collect` at log time, after the training loop's own end-of-step
``torch.cuda.synchronize()``, so timing adds no synchronisation to the hot path. On CPU they read
``time.perf_counter`` (CPU kernels and gloo collectives run synchronously, so wall-clock is exact).

Async collective results (``AsyncCollectiveTensor`` from functional collectives) are waited on at the
mark: the next op would wait anyway, and the end time must include the transfer.

Under train.cuda_graphs the regions run inside a captured graph, where neither works: an event
recorded during a capture times nothing at replay, and a replay runs none of the Python that makes
spans. :class:`DeviceClockTimer` keeps the same marks but makes each one a tiny kernel that reads
the GPU's own clock and sums the durations on the device, so replays time themselves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

try:  # the wrapper type of functional collectives' not-yet-waited results
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
except Exception:  # pragma: no cover - torch builds without distributed
    AsyncCollectiveTensor = ()  # type: ignore[assignment,misc]


def _settle(x: torch.Tensor) -> torch.Tensor:
    """The real tensor behind an async collective result (waits on the stream, not the host, on CUDA)."""
    return x.wait() if isinstance(x, AsyncCollectiveTensor) else x


@dataclass
class Span:
    """One timed occurrence of a region: up to two intervals, forward and backward."""

    timer: "RegionTimer"
    marks: dict[str, Any] = field(default_factory=dict)
    """`fwd_start`, `fwd_end`, `bwd_start`, `bwd_end`: CUDA events or perf_counter floats."""

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return _Mark.apply(_settle(x), self, "fwd_start", "bwd_end")

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        return _Mark.apply(_settle(x), self, "fwd_end", "bwd_start")

    def record(self, name: str) -> None:
        self.marks[name] = self.timer.now()

    def seconds(self, direction: str) -> float:
        start, end = self.marks.get(f"{direction}_start"), self.marks.get(f"{direction}_end")
        if start is None or end is None:
            return 0.0  # e.g. no backward (evaluation, or no input needed a gradient)
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1e3  # CUDA events report milliseconds


class _Mark(torch.autograd.Function):
    """Identity whose forward records `fwd_name` and whose backward records `bwd_name`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, span: Span, fwd_name: str, bwd_name: str) -> torch.Tensor:
        span.record(fwd_name)
        ctx.span, ctx.bwd_name = span, bwd_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = _settle(grad)
        ctx.span.record(ctx.bwd_name)
        return grad, None, None, None


class RegionTimer:
    """Collects spans per region name over one step; :meth:`reset` at the start of each step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list[Span]] = {}
        # CUDA events are reused from step to step (a deep model records thousands per step; creating
        # each anew costs host time). Reuse is safe: reset() runs after the previous step's sync.
        self._events: list[Any] = []
        self._next_event = 0

    def now(self) -> Any:
        if self.cuda:
            if self._next_event == len(self._events):
                self._events.append(torch.cuda.Event(enable_timing=True))
            event = self._events[self._next_event]
            self._next_event += 1
            event.record()
            return event
        return time.perf_counter()

    def span(self, region: str) -> Span:
        s = Span(self)
        self.spans.setdefault(region, []).append(s)
        return s

    def reset(self) -> None:
        self.spans = {}
        self._next_event = 0

    def collect(self) -> dict[str, tuple[float, float]]:
        """Seconds per region, (forward, backward) summed over its spans. On CUDA call it only after
        the step's work is known to be complete (the loop synchronises at the end of each step)."""
        return {region: (sum(s.seconds("fwd") for s in spans), sum(s.seconds("bwd") for s in spans))
                for region, spans in self.spans.items()}


def timed(timer: RegionTimer | None, region: str):
    """A span for `region`, or None when timing is off (callers skip the marks then)."""
    return None if timer is None else timer.span(region)


def run_timed(timer: RegionTimer | None, region: str, x: torch.Tensor, fn):
    """`fn(x)` between `region`'s start and end marks (forward and backward); plain `fn(x)` when off.
    Where `fn` returns a tuple, the marks go on its first tensor."""
    span = timed(timer, region)
    if span is None:
        return fn(x)
    out = fn(span.enter(x))
    if isinstance(out, tuple):
        return (span.exit(out[0]), *out[1:])
    return span.exit(out)


@triton.jit(do_not_specialize=["slot"])  # one compiled kernel for every slot: none compiles inside a capture
def _clock_mark(acc_ptr, slot, SIGN: tl.constexpr):
    """acc[slot] += SIGN * the GPU's nanosecond clock: a region's start subtracts it, its end adds it."""
    now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(acc_ptr + slot, tl.load(acc_ptr + slot) + SIGN * now)


class _ClockSpan(Span):
    """A span whose marks add to its region's accumulator slots instead of recording events."""

    def __init__(self, timer: "DeviceClockTimer", region: str) -> None:
        super().__init__(timer)
        self.region = region

    def record(self, name: str) -> None:
        direction, edge = name.split("_")
        self.timer.mark(self.region, direction, -1 if edge == "start" else 1)


class DeviceClockTimer(RegionTimer):
    """RegionTimer for regions captured in a CUDA graph (train.cuda_graphs), on CUDA only.

    Each mark launches a one-program kernel that adds the GPU's nanosecond clock (%globaltimer),
    negated at a region's start, into that region's forward or backward slot of an int64
    accumulator on the device. The kernels are captured with the rest, so every replay (every
    micro-batch) adds its durations, and :meth:`collect` reads the step's totals with one copy after
    the loop's end-of-step sync. Like the events, a mark runs once the work queued before it on the
    stream has finished. A slot's running sum stays within one clock reading (starts and ends
    alternate), far inside int64.
    """

    MAX_SLOTS = 4096

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"DeviceClockTimer reads a CUDA device's clock, got {device}")
        super().__init__(device)
        # Fixed for the run: a captured graph holds this buffer's address and the slot numbers.
        self.acc = torch.zeros(self.MAX_SLOTS, dtype=torch.int64, device=device)
        self.slots: dict[tuple[str, str], int] = {}

    def span(self, region: str) -> Span:
        return _ClockSpan(self, region)

    def mark(self, region: str, direction: str, sign: int) -> None:
        slot = self.slots.setdefault((region, direction), len(self.slots))
        if slot >= self.MAX_SLOTS:
            raise RuntimeError(f"DeviceClockTimer: more than {self.MAX_SLOTS // 2} timed regions")
        _clock_mark[(1,)](self.acc, slot, SIGN=sign)

    def reset(self) -> None:
        self.acc.zero_()  # in place: a captured graph keeps adding into this buffer

    def collect(self) -> dict[str, tuple[float, float]]:
        totals = self.acc[: len(self.slots)].tolist()
        out: dict[str, tuple[float, float]] = {}
        for (region, direction), slot in self.slots.items():
            fwd, bwd = out.get(region, (0.0, 0.0))
            seconds = totals[slot] / 1e9
            out[region] = (seconds, bwd) if direction == "fwd" else (fwd, seconds)
        return out
