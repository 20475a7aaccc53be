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

import math
from dataclasses import dataclass

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


def _diversity(counts_E: torch.Tensor) -> float:
    total = counts_E.sum().item()
    if total <= 0:
        return 0.0
    p = counts_E[counts_E > 0] / total
    return math.exp(-(p * p.log()).sum().item()) / counts_E.numel()


def _layers_text(items: dict[int, list[str]], limit: int = 16) -> str:
    parts = []
    for layer, what in sorted(items.items()):
        shown = ", ".join(what[:limit]) + (f", ... ({len(what)} in all)" if len(what) > limit else "")
        parts.append(f"layer {layer}: {shown}")
    return "; ".join(parts)


class HealthMonitor:
    def __init__(self, cfg: AlertsConfig) -> None:
        self.cfg = cfg
        self.dead_streak: dict[int, torch.Tensor] = {}
        """Per layer, int64 [E]: consecutive steps each expert has had no token."""
        self.saturated: dict[int, torch.Tensor] = {}
        """Per layer, bool [E]: above the saturation threshold on the previous step."""
        self.collapsed: dict[int, bool] = {}
        self.last_fired: dict[str, int] = {}
        """Per alert kind, the step it last fired."""
        self.held_back: dict[str, int] = {}
        """Per alert kind, alerts held back by the cooldown since it last fired."""

    def check(self, counts_by_layer: dict[int, torch.Tensor], step: int) -> list[Alert]:
        """Update the state with this step's global counts (int [E] per layer) and return new alerts."""
        if not self.cfg.enabled:
            return []
        c = self.cfg
        dead: dict[int, list[str]] = {}
        hot: dict[int, list[str]] = {}
        collapsed: dict[int, list[str]] = {}
        for layer, counts in counts_by_layer.items():
            counts_E = counts.detach().double().cpu()
            streak_E = self.dead_streak.get(layer, torch.zeros(counts_E.numel(), dtype=torch.int64))
            streak_E = torch.where(counts_E == 0, streak_E + 1, torch.zeros_like(streak_E))
            self.dead_streak[layer] = streak_E
            newly_dead = (streak_E == c.dead_expert_steps).nonzero().flatten().tolist()
            if newly_dead:
                dead[layer] = [str(e) for e in newly_dead]

            mean = counts_E.mean().item()
            factor_E = counts_E / mean if mean > 0 else torch.zeros_like(counts_E)
            over_E = factor_E > c.saturation_factor
            was_E = self.saturated.get(layer, torch.zeros_like(over_E))
            self.saturated[layer] = over_E
            newly_hot = (over_E & ~was_E).nonzero().flatten().tolist()
            if newly_hot:
                hot[layer] = [f"{e} ({factor_E[e].item():.1f}x)" for e in newly_hot]

            div = _diversity(counts_E)
            is_collapsed = mean > 0 and div < c.diversity_floor
            if is_collapsed and not self.collapsed.get(layer, False):
                collapsed[layer] = [f"diversity {div:.3f}"]
            self.collapsed[layer] = is_collapsed

        alerts = []
        if dead:
            alerts.append(Alert(step, "dead_expert", "dead experts",
                                f"no token for {c.dead_expert_steps} steps in a row: {_layers_text(dead)}"))
        if hot:
            alerts.append(Alert(step, "expert_saturation", "saturated experts",
                                f"more than {c.saturation_factor:g}x the mean load: {_layers_text(hot)}"))
        if collapsed:
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
