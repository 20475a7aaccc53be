"""Test-only fault injection: a worker kills or stops itself at a named point of training.

Used by tests/test_fault_tolerance.py (and benchmarks/kill_resume_gpu.py) to check restarts, resume
and hang reports on real processes. Nothing here runs unless `MOE_TEST_FAULT` is set in the worker's
environment (the launcher passes `MOE_TEST_*` through to its workers):

    MOE_TEST_FAULT="kill:rank=1:step=7:where=before_optimizer"          one fault
    MOE_TEST_FAULT="kill:rank=1:step=9:where=during_checkpoint;stop:..."  several, joined by ';'

- action `kill`: SIGKILL (a crashed host, the OOM killer); `stop`: SIGSTOP (a process that hangs).
- `rank`: the world rank that fires (default: every rank). `step`: the training step (default: any).
- `where`: one of `POINTS`; a collective's op name (`all_to_all`, ...) fires when the rank enters
  that collective (moe.parallel.inflight), at the step the loop last announced.
- `every`: fire on every attempt. Default: once per run dir; the marker file
  `<run dir>/.faults/<hash of the fault>.rank<r>` (holding the pid) is written before firing, so the
  restarted run passes the point.

`MOE_TEST_SKIP_RESTORE="rng,data"` makes a resume skip restoring the RNG and/or the data position (the
negative control that shows the tests would notice if resume forgot them).

Cost when unset: `point` checks one module-level list and returns.
"""
from __future__ import annotations

import hashlib
import os
import signal
from dataclasses import dataclass

ENV = "MOE_TEST_FAULT"
SKIP_ENV = "MOE_TEST_SKIP_RESTORE"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
POINTS = ("step_start", "before_optimizer", "during_checkpoint",
          "all_to_all", "all_gather", "all_reduce", "barrier", "broadcast")
SKIPPABLE = ("rng", "data")


@dataclass(frozen=True)
class Fault:
    action: str
    where: str
    rank: int | None = None
    step: int | None = None
    every: bool = False
    spec: str = ""
    """The text it was parsed from (names its marker file)."""


def parse(text: str) -> list[Fault]:
    """Faults from `MOE_TEST_FAULT`'s syntax; ValueError naming the bad part and what is allowed."""
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        action, *fields = spec.split(":")
        if action not in ACTIONS:
            raise ValueError(f"{ENV}={text!r}: action {action!r} must be one of {sorted(ACTIONS)}")
        kw: dict = {"action": action, "spec": spec}
        for f in fields:
            key, _, value = f.partition("=")
            if key in ("rank", "step") and value.lstrip("-").isdigit():
                kw[key] = int(value)
            elif key == "where" and value in POINTS:
                kw[key] = value
            elif key == "every" and value in ("", "1", "true"):
                kw[key] = True
            else:
                raise ValueError(f"{ENV}={text!r}: bad field {f!r}; allowed: rank=<int>, step=<int>, "
                                 f"where=<one of {list(POINTS)}>, every")
        if "where" not in kw:
            raise ValueError(f"{ENV}={text!r}: {spec!r} needs where=<one of {list(POINTS)}>")
        faults.append(Fault(**kw))
    return faults


_faults: list[Fault] = []
_run_dir = "."
_rank = 0
_step: int | None = None


def arm(run_dir: str, rank: int) -> None:
    """Read the environment once per worker (called by moe.train.worker.run_worker)."""
    global _faults, _run_dir, _rank, _step
    _faults = [f for f in parse(os.environ.get(ENV, "")) if f.rank in (None, rank)]
    _run_dir, _rank, _step = run_dir, rank, None


def point(where: str, step: int | None = None) -> None:
    """A place a fault may fire. `step` given: the loop announces the current step."""
    if not _faults:
        return
    global _step
    if step is not None:
        _step = step
    for f in _faults:
        if f.where == where and f.step in (None, _step) and _claim(f):
            print(f"[fault] rank {_rank} (pid {os.getpid()}): {f.action} at {where}, step {_step} ({ENV})", flush=True)
            os.kill(os.getpid(), ACTIONS[f.action])


def _claim(f: Fault) -> bool:
    """True when `f` should fire now: always with `every`, else only if no earlier attempt fired it.
    The marker holds the pid and its mtime is the moment the fault fired (tests read both)."""
    if f.every:
        return True
    folder = os.path.join(_run_dir, ".faults")
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, f"{hashlib.sha1(f.spec.encode()).hexdigest()[:12]}.rank{_rank}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def skip_restore(what: str) -> bool:
    """Test-only negative control: True when MOE_TEST_SKIP_RESTORE lists `what` (rng, data)."""
    if SKIP_ENV not in os.environ:
        return False
    names = {n.strip() for n in os.environ[SKIP_ENV].split(",") if n.strip()}
    bad = names - set(SKIPPABLE)
    if bad:
        raise ValueError(f"{SKIP_ENV}={os.environ[SKIP_ENV]!r}: {sorted(bad)} not allowed; use any of {list(SKIPPABLE)}")
    return what in names
