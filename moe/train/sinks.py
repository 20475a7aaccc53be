"""Metric sinks: one interface, a local JSON-lines file and wandb. Only one rank writes."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Protocol

SECRET_KEYS = ("api_key", "apikey", "token", "password", "secret")


class MetricsSink(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


class JsonlSink:
    """Appends one JSON object per logged step to `metrics.jsonl` in the run dir."""

    def __init__(self, run_dir: str) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._f = open(self.path, "a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._f.close()


def redact(obj: Any) -> Any:
    """Copy of a nested config dict with secret-looking values replaced."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if any(s in str(k).lower() for s in SECRET_KEYS) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class WandbSink:
    """wandb run in the run dir; offline by default so nothing leaves the machine without `wandb sync`."""

    def __init__(self, run_dir: str, mode: str, project: str, name: str, group: str | None,
                 entity: str | None, config: dict[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            dir=run_dir, mode=mode, project=project, name=name, group=group, entity=entity,
            config=redact(config), settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({"step": step, **{k: _jsonable(v) for k, v in metrics.items()}})

    def close(self) -> None:
        self.run.finish()


class MultiSink:
    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
