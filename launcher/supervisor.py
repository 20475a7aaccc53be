"""Watch one attempt's workers and say what went wrong when one fails.

When a worker fails, the others usually fail a moment later because of it (their collective lost its
peer), and a worker that is stopped or hung never answers at all. So after the first failure the
driver waits `GRACE_S` for the other ranks to report, classifies every rank's outcome, and puts the
likely cause first: a process that died, then a rank's own error, then ranks that only lost a peer,
then ranks that never answered (they are killed with the rest by the caller).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

GRACE_S = 5.0
"""How long the other ranks may take to report after the first failure, before all are killed."""

# How a rank's error reads when its only problem is that a peer went away (gloo, NCCL, sockets).
PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|ECONNRESET|"
                       r"Connection refused|NCCL communicator was aborted|remote process exited", re.I)
# Errors that a restart would only reproduce (same weights, same data): never retried.
NOT_RETRYABLE = ("NonFiniteError", "CudaGraphCaptureError")
KIND_ORDER = {"died": 0, "error": 1, "peer_lost": 2, "hung": 3}


@dataclass
class RankFailure:
    rank: int
    node: int
    kind: str
    """`died` (the process is gone: SIGKILL, OOM killer, segfault), `error` (it raised), `peer_lost` (it
    raised because a peer went away), `hung` (no answer within GRACE_S; killed)."""
    cause: str
    """One line: the exception's last line, or why the process is gone."""
    text: str
    """Everything the worker or Ray said (the remote traceback)."""

    def headline(self) -> str:
        verb = {"died": "died", "error": "failed", "peer_lost": "lost a peer", "hung": "did not answer"}[self.kind]
        return f"worker rank {self.rank} (node {self.node}) {verb}: {self.cause}"


class AttemptFailed(Exception):
    """One attempt's failure: every rank that did not finish, likely cause first."""

    def __init__(self, failures: list[RankFailure], note: str | None = None) -> None:
        self.failures = sorted(failures, key=lambda f: (KIND_ORDER[f.kind], f.rank))
        self.note = note
        super().__init__(self.primary.headline())

    @property
    def primary(self) -> RankFailure:
        return self.failures[0]

    @property
    def retryable(self) -> bool:
        return not any(name in f.text for f in self.failures for name in NOT_RETRYABLE)

    def details(self) -> str:
        """One line per rank that did not finish (likely cause first), the note if any, then the
        primary rank's error in full."""
        lines = [f.headline() for f in self.failures]
        if self.note:
            lines.append(self.note)
        if self.primary.text:
            lines += [f"rank {self.primary.rank}'s error in full:", self.primary.text]
        return "\n".join(lines)


def error_text(e: BaseException) -> str:
    """The worker's own error: RayTaskError carries the remote traceback, actor deaths say why (Ray's
    terminal colour codes removed, so logs and tests read plain text)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()


def _cause_line(text: str) -> str:
    """The raised exception's line ("module.Type: message") nearest the end of a traceback."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Failure|Interrupt|Exit)\b:?", ln):
            return ln[:400]
    return (lines[-1] if lines else "no message")[:400]


def classify(rank: int, node: int, e: BaseException) -> RankFailure:
    from ray.exceptions import RayActorError, RayTaskError

    text = error_text(e)
    if isinstance(e, RayActorError) and not isinstance(e, RayTaskError):
        # Ray's own explanation, up to its list of common causes (which we summarise instead).
        detail = re.search(r"exit detail:\s*(.+?)(?:\s+Some common causes|$)", " ".join(text.split()), re.I)
        cause = ("the worker process is gone: killed (SIGKILL, the OOM killer) or crashed"
                 + (f"; Ray: {detail.group(1)[:200]}" if detail else ""))
        return RankFailure(rank, node, "died", cause, text)
    return RankFailure(rank, node, "peer_lost" if PEER_LOST.search(text) else "error", _cause_line(text), text)


def watch(refs: list[Any], node_of_rank: list[int], on_idle: Callable[[], None], grace_s: float = GRACE_S) -> Any:
    """Wait for every rank (calling `on_idle` about 5 times a second, e.g. to feed the progress bar);
    returns rank 0's result, or raises AttemptFailed naming every rank that did not finish."""
    import ray

    rank_of = {ref: r for r, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    failures: list[RankFailure] = []
    pending = list(refs)

    def collect(done: list[Any]) -> None:
        for ref in done:
            rank = rank_of[ref]
            try:
                results[rank] = ray.get(ref)
            except Exception as e:  # RayTaskError, RayActorError, ...
                failures.append(classify(rank, node_of_rank[rank], e))

    while pending and not failures:
        done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
        on_idle()
        collect(done)
    if not failures:
        return results[0]
    if pending:  # give the others a moment to say what they saw (a dead peer makes them raise at once)
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=grace_s)
        collect(done)
    first = failures[0]
    for ref in pending:
        rank = rank_of[ref]
        failures.append(RankFailure(rank, node_of_rank[rank], "hung",
                                    f"no answer {grace_s:g} s after rank {first.rank} failed (stopped, hung or busy); "
                                    "killed with the others", ""))
    raise AttemptFailed(failures)
