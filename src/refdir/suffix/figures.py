"""Figures for ``refdir suffix`` (matplotlib, Agg backend, PNG): the per-layer projection onto the
refusal direction, the top heads' attention split, and the search objective."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from refdir.artifacts.suffix import SuffixAnalysis
from refdir.io import atomic_path

__all__ = [
    "ATTENTION_PNG",
    "OBJECTIVE_PNG",
    "PROJECTION_PNG",
    "plot_attention",
    "plot_objective",
    "plot_projection",
    "write_figures",
]

PROJECTION_PNG = "projection.png"
ATTENTION_PNG = "attention.png"
OBJECTIVE_PNG = "objective.png"

_COLORS = {"alone": "#c0392b", "adversarial": "#2471a3", "random": "#7f8c8d"}
_LABELS = {
    "alone": "instruction alone",
    "adversarial": "+ adversarial suffix",
    "random": "+ random suffix",
}
_REGION_COLORS = ("#e67e22", "#2471a3", "#bdc3c7")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_projection(analysis: SuffixAnalysis, path: str | Path) -> Path:
    """Mean projection onto the unit direction at every layer, one curve per condition."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in zip(analysis.conditions, analysis.projection, strict=True):
        ax.plot(
            range(len(values)),
            values,
            marker=".",
            color=_COLORS.get(name),
            label=_LABELS.get(name, name),
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axvline(analysis.direction_layer, color="black", linestyle=":", linewidth=1)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("layer (residual stream input; last = final output)")
    ax.set_ylabel("projection onto refusal direction")
    ax.set_title(
        f"{analysis.model}: post-instruction tokens, {len(analysis.prompts)} held-out prompts"
    )
    ax.legend(frameon=False)
    return _save(fig, Path(path))


def plot_attention(analysis: SuffixAnalysis, path: str | Path) -> Path:
    """For each top head, one stacked bar per condition: attention mass by region."""
    split = np.asarray(analysis.attention_split)  # [C, top, R]
    n_cond, n_top = split.shape[0], split.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * n_top + 2), 4))
    width = 0.8 / max(n_cond, 1)
    for ci in range(n_cond):
        x = np.arange(n_top) + (ci - (n_cond - 1) / 2) * width
        bottom = np.zeros(n_top)
        for ri, region in enumerate(analysis.regions):
            ax.bar(
                x,
                split[ci, :, ri],
                width * 0.95,
                bottom=bottom,
                color=_REGION_COLORS[ri % len(_REGION_COLORS)],
                edgecolor="white",
                label=region if ci == 0 else None,
            )
            bottom += split[ci, :, ri]
    ax.set_xticks(np.arange(n_top))
    ax.set_xticklabels([f"L{layer}H{head}" for layer, head in analysis.top_heads])
    ax.set_ylabel("attention of the last position")
    ax.set_ylim(0, 1.05)
    order = ", ".join(analysis.conditions)
    ax.set_title(f"top heads by attribution to the direction; bars per head: {order}")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, Path(path))


def plot_objective(
    history: Sequence[float], best: Sequence[float], path: str | Path, objective: str = "refusal"
) -> Path:
    """Objective of the current suffix and the best so far, per search step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(history)), history, color="#2471a3", alpha=0.6, label="current")
    ax.plot(range(len(best)), best, color="#c0392b", label="best")
    ax.set_xlabel("step")
    ax.set_ylabel("refusal log-odds" if objective == "refusal" else "target cross-entropy")
    ax.legend(frameon=False)
    return _save(fig, Path(path))


def write_figures(
    folder: str | Path,
    analysis: SuffixAnalysis,
    history: Sequence[float],
    best: Sequence[float],
    objective: str = "refusal",
) -> list[Path]:
    """``projection.png``, ``attention.png`` and ``objective.png`` in ``folder``."""
    out = Path(folder)
    return [
        plot_projection(analysis, out / PROJECTION_PNG),
        plot_attention(analysis, out / ATTENTION_PNG),
        plot_objective(history, best, out / OBJECTIVE_PNG, objective),
    ]
