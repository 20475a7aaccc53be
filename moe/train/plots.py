"""Heatmaps written as PNG files: tokens per expert (layers x experts), rank x rank traffic.

matplotlib is imported lazily and used through its object API on the Agg canvas (no pyplot: workers
have no display, and pyplot's global figure registry only adds cost); a machine without matplotlib
gets no pictures and one warning instead of a failed run."""
from __future__ import annotations

import os
from typing import Sequence

import torch

_warned = False


def _figure_class():
    global _warned
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned:
            print("[metrics] warning: matplotlib is not installed; no heatmaps are written", flush=True)
            _warned = True
        return None
    return Figure


def heatmap(values_RC: torch.Tensor, path: str, title: str, xlabel: str, ylabel: str,
            row_labels: Sequence[str], col_labels: Sequence[str] | None = None, annotate: bool = False) -> str | None:
    """Save `values_RC` as a heatmap PNG at `path`; returns the path, or None without matplotlib."""
    Figure = _figure_class()
    if Figure is None:
        return None
    v = values_RC.detach().double().cpu().numpy()
    R, C = v.shape
    fig = Figure(figsize=(max(4.5, min(2 + 0.35 * C, 16)), max(3.0, min(1.5 + 0.35 * R, 12))))
    ax = fig.subplots()
    im = ax.imshow(v, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if R <= 64:
        ax.set_yticks(range(R), labels=list(row_labels))
    if col_labels is not None and C <= 64:
        ax.set_xticks(range(C), labels=list(col_labels))
    if annotate and R * C <= 64:  # small matrices (rank x rank) read better with the numbers on them
        mid = (v.max() + v.min()) / 2
        for r in range(R):
            for c in range(C):  # dark text on the bright (high) end of viridis, light on the dark end
                ax.text(c, r, f"{v[r, c]:.0f}", ha="center", va="center", color="k" if v[r, c] > mid else "w", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=80)  # Figure.savefig renders on an Agg canvas; nothing to close
    return path


def expert_load_heatmap(counts_by_layer: dict[int, torch.Tensor], path: str, step: int) -> str | None:
    """Rows: MoE layers; columns: experts; colour: tokens (kept assignments) this step, global."""
    layers = sorted(counts_by_layer)
    counts_LE = torch.stack([counts_by_layer[i].cpu() for i in layers])
    return heatmap(counts_LE, path, f"tokens per expert, step {step}", "expert", "layer",
                   [str(i) for i in layers], [str(e) for e in range(counts_LE.shape[1])])


def traffic_heatmap(matrix_RR: torch.Tensor, path: str, step: int) -> str | None:
    """Token vectors sent from EP rank (row) to EP rank (column), summed over MoE layers."""
    R = matrix_RR.shape[0]
    return heatmap(matrix_RR, path, f"all-to-all token rows, step {step}\n(sum over MoE layers)", "to EP rank",
                   "from EP rank", [str(r) for r in range(R)], [str(r) for r in range(R)], annotate=True)
