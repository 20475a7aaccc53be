"""Which collective this rank is inside right now, so a timeout or a lost peer can be reported as
"rank 0 timed out in all_to_all on group ep (dispatch, layer 1)" instead of a bare gloo/NCCL error.

A collective is *in flight* from the moment the rank enters it until its result is ready. Callers
mark it with `collective(...)` (blocking calls) or `autograd_collective(...)` (functional collectives
whose backward is another collective). When an exception escapes, the record is deliberately left
set: `current()` then names the collective the rank was stuck in (read by moe.train.worker).

Cost: one small object and two assignments per collective; no synchronisation. On NCCL, collectives
return before they finish and a timeout is raised by the watchdog thread (which tears the process down
after writing the flight recorder dump), so there the record names the last collective entered.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from moe.train import faults

try:  # the wrapper type of functional collectives' not-yet-waited results
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
except Exception:  # pragma: no cover - torch builds without distributed
    AsyncCollectiveTensor = ()  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class Collective:
    group: str
    """Mesh dimension of the process group: ep, dp, edp, routing, or world."""
    op: str
    """all_to_all, all_gather, all_reduce, barrier, broadcast."""
    what: str
    """What it carries, e.g. `dispatch, layer 1, forward`."""
    entered: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        return f"{self.op} on group '{self.group}' ({self.what})"


_current: Collective | None = None


def current() -> Collective | None:
    """The collective this rank entered and has not left (None between collectives)."""
    return _current


def reset() -> None:
    global _current
    _current = None


@contextmanager
def collective(group: str, op: str, what: str) -> Iterator[None]:
    """Mark a blocking collective. On an exception the record stays (see the module docstring)."""
    global _current
    _current = Collective(group, op, what)
    faults.point(op)  # test-only: a rank may stop or die right here
    yield
    _current = None


class _BackwardMark(torch.autograd.Function):
    """Identity; in the backward pass it sets (`enter`) or clears the in-flight record."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, record: Collective, enter: bool) -> torch.Tensor:
        ctx.record, ctx.enter = record, enter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        global _current
        if ctx.enter:
            _current = Collective(ctx.record.group, ctx.record.op, ctx.record.what)
            faults.point(ctx.record.op)
        else:
            if isinstance(grad, AsyncCollectiveTensor):
                grad = grad.wait()  # the backward collective's result: ready before we leave it
            _current = None
        return grad, None, None


def autograd_collective(group: str, op: str, what: str, x: torch.Tensor,
                        fn: Callable[[torch.Tensor], torch.Tensor],
                        meanwhile: Callable[[], None] | None = None) -> torch.Tensor:
    """`fn(x)` (a functional collective with autograd) marked in flight in the forward pass, and its
    backward collective marked too. `meanwhile()` is launched after the collective and before the
    forward result is waited for (inside the mark; on CUDA a stream wait, not a host sync), so
    independent work overlaps the transfer."""
    back = Collective(group, op, f"{what}, backward")
    x = _BackwardMark.apply(x, back, False)
    with collective(group, op, f"{what}, forward"):
        y = fn(x)
        if meanwhile is not None:
            meanwhile()
        if isinstance(y, AsyncCollectiveTensor):
            y = y.wait()
    return _BackwardMark.apply(y, back, True)
