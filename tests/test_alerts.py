"""Expert-health alerts: when they fire, that they fire once, and that a training run prints and records them."""
from __future__ import annotations

import json

import torch

from moe.config import AlertsConfig
from moe.train.alerts import HealthMonitor


def counts(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_dead_expert_fires_once_after_k_steps_and_again_after_recovery():
    mon = HealthMonitor(AlertsConfig(dead_expert_steps=3, saturation_factor=100, diversity_floor=0, cooldown_steps=0))
    fired = []
    seq = [counts(4, 4, 0, 4)] * 5 + [counts(4, 4, 1, 3)] + [counts(4, 4, 0, 4)] * 3
    for step, c in enumerate(seq):
        fired += [(step, a.kind, a.text) for a in mon.check({2: c}, step)]
    assert [(s, k) for s, k, _ in fired] == [(2, "dead_expert"), (8, "dead_expert")]
    assert "layer 2: 2" in fired[0][2] and "3 steps in a row" in fired[0][2]


def test_saturation_fires_on_crossing_and_rearms():
    mon = HealthMonitor(AlertsConfig(dead_expert_steps=100, saturation_factor=2.0, diversity_floor=0, cooldown_steps=0))
    hot, calm = counts(9, 1, 1, 1), counts(3, 3, 3, 3)  # expert 0 at 3x the mean, then 1x
    kinds = [[a.kind for a in mon.check({1: c}, s)] for s, c in enumerate([hot, hot, calm, hot])]
    assert kinds == [["expert_saturation"], [], [], ["expert_saturation"]]
    mon2 = HealthMonitor(AlertsConfig(dead_expert_steps=100, saturation_factor=2.0, diversity_floor=0, cooldown_steps=0))
    (alert,) = mon2.check({1: hot, 3: calm}, 0)
    assert alert.text.endswith("layer 1: 0 (3.0x)")  # names the layer, the expert and its factor


def test_router_collapse_and_merging_per_step():
    mon = HealthMonitor(AlertsConfig(dead_expert_steps=1, saturation_factor=3.0, diversity_floor=0.5, cooldown_steps=0))
    collapsed = counts(60, 1, 1, 1, 1, 0, 0, 0)  # almost everything on expert 0
    alerts = mon.check({1: collapsed, 2: collapsed, 3: counts(*[8] * 8)}, 7)
    by_kind = {a.kind: a for a in alerts}
    assert set(by_kind) == {"dead_expert", "expert_saturation", "router_collapse"}  # one alert per kind
    assert "layer 1" in by_kind["router_collapse"].text and "layer 2" in by_kind["router_collapse"].text
    assert "layer 3" not in by_kind["router_collapse"].text
    assert by_kind["dead_expert"].text.endswith("layer 1: 5, 6, 7; layer 2: 5, 6, 7")
    assert by_kind["router_collapse"].line().startswith("[moe-alert] WARNING step 7: router collapse:")
    assert mon.check({1: collapsed, 2: collapsed, 3: counts(*[8] * 8)}, 8) == []  # lasting state: no repeat


def test_disabled_monitor_is_silent():
    mon = HealthMonitor(AlertsConfig(enabled=False, dead_expert_steps=1))
    assert mon.check({1: counts(8, 0, 0, 0)}, 0) == []


def test_training_run_prints_and_records_alerts(tmp_path, capsys):
    import moe.model.router as router_mod
    from moe.train.loop import train
    from tests.test_observability import _job, skewed_routing

    original = router_mod.Router.forward
    try:
        skewed_routing()  # experts 6 and 7 never get a token; expert 0 gets every token
        train(_job(tmp_path, ["train.steps=3", "logger.plot_every=0", "logger.alerts.dead_expert_steps=2",
                              "logger.alerts.saturation_factor=3.5", "logger.alerts.diversity_floor=0.6"]))
    finally:
        router_mod.Router.forward = original
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "alerts.jsonl")]
    assert [(r["step"], r["kind"]) for r in rows] == [(0, "expert_saturation"), (0, "router_collapse"), (1, "dead_expert")]
    assert "layer 1: 6, 7; layer 2: 6, 7; layer 3: 6, 7" in rows[2]["text"]
    for r in rows:
        assert f"[moe-alert] WARNING step {r['step']}: {r['title']}: {r['text']}" in out


def test_cooldown_holds_back_repeats_and_counts_them():
    mon = HealthMonitor(AlertsConfig(dead_expert_steps=100, saturation_factor=2.0, diversity_floor=0, cooldown_steps=4))
    hot, calm = counts(9, 1, 1, 1), counts(3, 3, 3, 3)
    fired = {s: mon.check({1: c}, s) for s, c in enumerate([hot, calm, hot, calm, hot, calm])}
    assert [s for s, a in fired.items() if a] == [0, 4]  # the crossing at step 2 is held back
    assert "(1 more held back since step 0" in fired[4][0].text
