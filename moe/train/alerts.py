"""Expert-health alerts from each step's global tokens per expert (run on the logging rank only).

Three conditions, each edge-triggered so a lasting problem alerts once, not every step:
- dead expert: an expert received no token for `dead_expert_steps` steps in a row (fires on the step
  the streak reaches K; a new streak after it received tokens again can fire again);
- saturation: an expert received more than `saturation_factor` x the mean tokens per expert (fires
  when it crosses the threshold; re-armed once it is back below);
- router collapse: a layer's expert diversity exp(entropy of the load distribution) / E fell below
  `diversity_floor` (1 = uniform, 1/E = every token on one expert; re-armed once back above).
Alerts of one kind on one step are merged into one message naming every layer and expert. After an
alert, others of the same kind are held back for `cooldown_steps` steps and counted; the next one says
how many were held back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moe.config import AlertsConfig


@dataclass
class Alert:
    step: int
    kind: str
    """`dead_expert`, `expert_saturation` or `router_collapse`."""
    title: str
    text: str
    level: str = "WARN"

    def line(self) -> str:
        return f"[moe-alert] WARNING step {self.step}: {self.title}: {self.text}"


def _diversity_L(counts_LE: np.ndarray) -> np.ndarray:
    """Per layer exp(entropy of the load distribution) / E; 0 for a layer with no tokens."""
    total_L = counts_LE.sum(1)
    p_LE = counts_LE / np.where(total_L > 0, total_L, 1.0)[:, None]
    plogp_LE = np.where(p_LE > 0, p_LE * np.log(np.where(p_LE > 0, p_LE, 1.0)), 0.0)
    return np.where(total_L > 0, np.exp(-plogp_LE.sum(1)) / counts_LE.shape[1], 0.0)


def _layers_text(items: dict[int, list[str]], limit: int = 16) -> str:
    parts = []
    for layer, what in sorted(items.items()):
        shown = ", ".join(what[:limit]) + (f", ... ({len(what)} in all)" if len(what) > limit else "")
        parts.append(f"layer {layer}: {shown}")
    return "; ".join(parts)


class HealthMonitor:
    """State and checks on [layers, experts] numpy arrays: a handful of array operations per step for
    the whole model (the per-step host cost counts against the metrics' overhead budget)."""

    def __init__(self, cfg: AlertsConfig) -> None:
        self.cfg = cfg
        self.layers: list[int] = []
        self.dead_streak_LE = np.zeros((0, 0), dtype=np.int64)
        """Consecutive steps each expert has had no token."""
        self.saturated_LE = np.zeros((0, 0), dtype=bool)
        """Above the saturation threshold on the previous step."""
        self.collapsed_L = np.zeros(0, dtype=bool)
        self.last_fired: dict[str, int] = {}
        """Per alert kind, the step it last fired."""
        self.held_back: dict[str, int] = {}
        """Per alert kind, alerts held back by the cooldown since it last fired."""

    def check(self, counts_by_layer: dict[int, torch.Tensor], step: int) -> list[Alert]:
        """Update the state with this step's global counts (int [E] per layer) and return new alerts."""
        if not self.cfg.enabled or not counts_by_layer:
            return []
        c = self.cfg
        layers = sorted(counts_by_layer)
        counts_LE = np.stack([counts_by_layer[i].detach().cpu().numpy() for i in layers]).astype(np.float64)
        if layers != self.layers or counts_LE.shape != self.dead_streak_LE.shape:  # first step: no history
            self.layers = layers
            self.dead_streak_LE = np.zeros(counts_LE.shape, dtype=np.int64)
            self.saturated_LE = np.zeros(counts_LE.shape, dtype=bool)
            self.collapsed_L = np.zeros(len(layers), dtype=bool)

        self.dead_streak_LE = np.where(counts_LE == 0, self.dead_streak_LE + 1, 0)
        newly_dead_LE = self.dead_streak_LE == c.dead_expert_steps

        mean_L = counts_LE.mean(1)
        factor_LE = np.divide(counts_LE, mean_L[:, None], out=np.zeros_like(counts_LE), where=mean_L[:, None] > 0)
        over_LE = factor_LE > c.saturation_factor
        newly_hot_LE = over_LE & ~self.saturated_LE
        self.saturated_LE = over_LE

        div_L = _diversity_L(counts_LE)
        is_collapsed_L = (mean_L > 0) & (div_L < c.diversity_floor)
        newly_collapsed_L = is_collapsed_L & ~self.collapsed_L
        self.collapsed_L = is_collapsed_L

        def by_layer(mask_LE: np.ndarray, label) -> dict[int, list[str]]:
            out: dict[int, list[str]] = {}
            for l, e in zip(*np.nonzero(mask_LE)):
                out.setdefault(layers[l], []).append(label(l, e))
            return out

        alerts = []
        if newly_dead_LE.any():
            dead = by_layer(newly_dead_LE, lambda l, e: str(e))
            alerts.append(Alert(step, "dead_expert", "dead experts",
                                f"no token for {c.dead_expert_steps} steps in a row: {_layers_text(dead)}"))
        if newly_hot_LE.any():
            hot = by_layer(newly_hot_LE, lambda l, e: f"{e} ({factor_LE[l, e]:.1f}x)")
            alerts.append(Alert(step, "expert_saturation", "saturated experts",
                                f"more than {c.saturation_factor:g}x the mean load: {_layers_text(hot)}"))
        if newly_collapsed_L.any():
            collapsed = {layers[l]: [f"diversity {div_L[l]:.3f}"] for l in np.nonzero(newly_collapsed_L)[0]}
            alerts.append(Alert(step, "router_collapse", "router collapse",
                                f"expert diversity below {c.diversity_floor:g}: {_layers_text(collapsed)}"))
        return [a for a in alerts if self._release(a)]

    def _release(self, alert: Alert) -> bool:
        """Apply the cooldown; a released alert mentions how many of its kind were held back."""
        last = self.last_fired.get(alert.kind)
        if last is not None and alert.step - last < self.cfg.cooldown_steps:
            self.held_back[alert.kind] = self.held_back.get(alert.kind, 0) + 1
            return False
        held = self.held_back.pop(alert.kind, 0)
        if held:
            alert.text += f" ({held} more held back since step {last}: logger.alerts.cooldown_steps={self.cfg.cooldown_steps})"
        self.last_fired[alert.kind] = alert.step
        return True
