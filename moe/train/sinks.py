"""Metric sinks: one interface, a local JSON-lines file and wandb. Only one rank writes.

Every sink gets the same scalar keys (`log`), the same pictures and histograms (`log_media`) and the
same alerts (`alert`). The local files in the run dir: `metrics.jsonl` (one row per logged step),
`media.jsonl` (PNG paths relative to the run dir, histogram values), `alerts.jsonl`."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Union

if TYPE_CHECKING:
    from moe.train.alerts import Alert

SECRET_KEYS = ("api_key", "apikey", "token", "password", "secret")
# Environment variables whose values must never reach a log: names containing one of these.
SECRET_ENV_NAMES = ("KEY", "TOKEN", "SECRET", "PASSWORD")


@dataclass
class Image:
    path: str
    """A PNG file inside the run dir."""


@dataclass
class Histogram:
    values: list[float]


Media = Union[Image, Histogram]


class MetricsSink(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def log_media(self, media: dict[str, Media], step: int) -> None: ...

    def alert(self, alert: "Alert") -> None: ...

    def close(self) -> None: ...


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


class JsonlSink:
    """Appends one JSON object per logged step to `metrics.jsonl` in the run dir (media and alerts
    to `media.jsonl` and `alerts.jsonl` next to it)."""

    def __init__(self, run_dir: str) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._f = open(self.path, "a", buffering=1)
        self._extra: dict[str, Any] = {}

    def _append(self, name: str, row: dict[str, Any]) -> None:
        if name not in self._extra:
            self._extra[name] = open(os.path.join(self.run_dir, name), "a", buffering=1)
        self._extra[name].write(json.dumps(row) + "\n")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")

    def log_media(self, media: dict[str, Media], step: int) -> None:
        row: dict[str, Any] = {"step": step}
        for k, m in media.items():
            row[k] = ({"image": os.path.relpath(m.path, self.run_dir)} if isinstance(m, Image)
                      else {"histogram": [_jsonable(v) for v in m.values]})
        self._append("media.jsonl", row)

    def alert(self, alert: "Alert") -> None:
        self._append("alerts.jsonl", {"step": alert.step, "kind": alert.kind, "title": alert.title,
                                      "text": alert.text, "level": alert.level})

    def close(self) -> None:
        self._f.close()
        for f in self._extra.values():
            f.close()


def env_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables named like secrets (WANDB_API_KEY, HF_TOKEN, ...)."""
    env = os.environ if environ is None else environ
    return [v for k, v in env.items() if any(s in k.upper() for s in SECRET_ENV_NAMES) and len(v) >= 8]


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """Copy of a nested config dict with secret-looking keys' values replaced, and any string that
    contains a secret from the environment (e.g. a key pasted into a run name) replaced too."""
    secrets = env_secrets() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: ("<redacted>" if any(s in str(k).lower() for s in SECRET_KEYS) else redact(v, secrets))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return "<redacted>"
    return obj


class WandbSink:
    """wandb run in the run dir; offline by default so nothing leaves the machine without `wandb sync`."""

    def __init__(self, run_dir: str, mode: str, project: str, name: str, group: str | None,
                 entity: str | None, config: dict[str, Any], run_id: str | None = None) -> None:
        import wandb

        self._wandb = wandb
        # A resumed training run (run_id from its checkpoint) keeps logging into the same wandb run.
        self.run = wandb.init(
            dir=run_dir, mode=mode, project=project, name=name, group=group, entity=entity,
            config=redact(config), settings=wandb.Settings(silent=True, console="off"),
            id=run_id, resume="allow" if run_id else None,
        )
        # Every series, pictures and histograms included, is plotted against the training step.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({"step": step, **{k: _jsonable(v) for k, v in metrics.items()}})

    def log_media(self, media: dict[str, Media], step: int) -> None:
        w = self._wandb
        row: dict[str, Any] = {"step": step}
        for k, m in media.items():
            row[k] = w.Image(m.path) if isinstance(m, Image) else w.Histogram(m.values)
        self.run.log(row)

    def alert(self, alert: "Alert") -> None:
        # Offline runs store the alert as a record in the .wandb file; `wandb sync` sends it later.
        level = getattr(self._wandb.AlertLevel, alert.level, self._wandb.AlertLevel.WARN)
        self.run.alert(title=alert.title, text=f"step {alert.step}: {alert.text}", level=level)

    def close(self) -> None:
        self.run.finish()


class MultiSink:
    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run's id (saved in checkpoints so a resumed run continues it); None without wandb."""
        return next((s.run.id for s in self.sinks if isinstance(s, WandbSink)), None)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def log_media(self, media: dict[str, Media], step: int) -> None:
        for s in self.sinks:
            if hasattr(s, "log_media"):  # sinks written before media existed only take scalars
                s.log_media(media, step)

    def alert(self, alert: "Alert") -> None:
        for s in self.sinks:
            if hasattr(s, "alert"):
                s.alert(alert)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
