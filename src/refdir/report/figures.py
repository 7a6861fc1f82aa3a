"""Figures of a `refdir run` report: one small function per figure, each returning a
matplotlib ``Figure`` built without pyplot (no global state, Agg rendering), sized for a paper
column at ``DPI``. Layouts use fixed margins: a layout engine would double the drawing time."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.colorbar import Colorbar
from matplotlib.colors import Colormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.selection import SelectionRecord

__all__ = [
    "DPI",
    "comparison_bars",
    "cosine_curves",
    "cosine_to_candidates",
    "png_bytes",
    "projection_curves",
    "refusal_bars",
    "selection_heatmaps",
]

DPI = 100
CHOSEN_COLOR = "#00a651"
REFUSAL_COLOR = "#b2182b"
SAFETY_COLOR = "#2166ac"
CONDITIONS = ("baseline", "ablation", "actadd")
CONDITION_LABELS = {
    "baseline": "baseline",
    "ablation": "ablation",
    "actadd": "act. add",
}
SCORES = {
    "bypass": ("bypass: refusal log-odds, harmful_val, direction ablated", "RdBu_r"),
    "induce": ("induce: refusal log-odds, harmless_val, direction added", "RdBu_r"),
    "kl": ("KL(baseline ‖ ablated), harmless_val, last position", "viridis"),
}


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (no timestamp or software tag, so reruns are identical)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


# --------------------------------------------------------------------------- heatmaps


def selection_heatmaps(selection: SelectionRecord, n_layers: int) -> Figure:
    """Bypass, induce and KL over position x layer, one panel each, as in the paper's figures.

    Skipped candidates (``null``) are hatched, layers excluded by ``max_layer_fraction`` are
    shaded behind a dashed line, candidates passing every filter carry a dot and the chosen
    one a black-and-white frame (visible on every colour map).
    """
    keys = list(SCORES)
    fig, axes = _stacked_panels(len(keys), len(selection.positions))
    for ax, key in zip(axes, keys, strict=True):
        _score_panel(fig, ax, selection, key, n_layers)
        if ax is not axes[-1]:
            ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("layer (residual stream input)", fontsize=9)
    _legend(fig, selection)
    fig.suptitle("Candidate directions: selection scores", fontsize=11, fontweight="bold")
    return fig


def _stacked_panels(n_panels: int, n_rows: int) -> tuple[Figure, list[Axes]]:
    """A 9-inch-wide figure of ``n_panels`` heatmap axes stacked with fixed margins (in
    inches, no layout engine: constrained layout would double the drawing time)."""
    width, top, title, bottom = 9.0, 0.35, 0.4, 0.8
    panel = 0.2 + 0.28 * n_rows
    height = top + n_panels * (title + panel) + bottom
    fig = Figure(figsize=(width, height), dpi=DPI)
    axes = []
    for i in range(n_panels):
        y = height - top - title - panel - i * (title + panel)
        axes.append(fig.add_axes((0.75 / width, y / height, 1 - 1.55 / width, panel / height)))
    return fig, axes


def score_grid(selection: SelectionRecord, key: str) -> np.ndarray:
    """A [P, L] float array of one score, ``nan`` where the candidate was skipped."""
    rows = getattr(selection, key)
    return np.array(
        [[math.nan if v is None else float(v) for v in row] for row in rows], dtype=float
    )


def _score_panel(
    fig: Figure, ax: Axes, selection: SelectionRecord, key: str, n_layers: int
) -> None:
    values = score_grid(selection, key)
    title, cmap_name = SCORES[key]
    cmap: Colormap = matplotlib.colormaps[cmap_name].with_extremes(bad="white")
    norm = _kl_norm(values) if key == "kl" else _log_odds_norm(values)
    image = ax.imshow(
        _shown(values, norm), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest"
    )
    _hatch_skipped(ax, values)
    _shade_excluded_layers(ax, selection, n_layers)
    _mark_passed(ax, selection)
    _mark_chosen(ax, selection)
    _label_axes(ax, selection)
    ax.set_title(title + _chosen_suffix(selection, key), fontsize=9, loc="left")
    box = ax.get_position()
    cax = fig.add_axes((box.x1 + 0.01, box.y0, 0.015, box.height))
    bar = fig.colorbar(image, cax=cax)
    bar.ax.tick_params(labelsize=7)
    _colorbar_marks(bar, selection, key)


def _shown(values: np.ndarray, norm: Normalize) -> np.ma.MaskedArray:
    """Skipped cells masked (drawn blank); on a log scale, zeros lifted to its floor."""
    if isinstance(norm, LogNorm) and norm.vmin is not None:
        values = np.where(np.isfinite(values) & (values <= 0), norm.vmin, values)
    return np.ma.masked_invalid(values)


def _log_odds_norm(values: np.ndarray) -> Normalize:
    """Symmetric about 0 (log-odds 0: refusal as likely as not), so colour shows the sign."""
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return Normalize(-limit, limit)


def _kl_norm(values: np.ndarray) -> Normalize:
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size and positive.max() / positive.min() > 100.0:
        return LogNorm(float(positive.min()), float(positive.max()))
    high = float(positive.max()) if positive.size else 1.0
    return Normalize(0.0, high)


def _hatch_skipped(ax: Axes, values: np.ndarray) -> None:
    for row, col in zip(*np.nonzero(~np.isfinite(values)), strict=True):
        ax.add_patch(
            Rectangle(
                (col - 0.5, row - 0.5), 1, 1, fill=False, hatch="////", edgecolor="0.55", lw=0
            )
        )


def _excluded_from(selection: SelectionRecord, n_layers: int) -> int | None:
    """Column index of the first layer excluded by ``max_layer_fraction``, if any."""
    bound = selection.filters.layer_bound(n_layers)
    layers = selection.layers
    return next((i for i, layer in enumerate(layers) if layer >= bound), None)


def _shade_excluded_layers(ax: Axes, selection: SelectionRecord, n_layers: int) -> None:
    start = _excluded_from(selection, n_layers)
    if start is None:
        return
    end = len(selection.layers) - 0.5
    ax.axvspan(start - 0.5, end, facecolor="white", alpha=0.55, edgecolor="none", zorder=2)
    ax.axvline(start - 0.5, color="black", lw=1.2, ls="--", zorder=3)


def _legend(fig: Figure, selection: SelectionRecord) -> None:
    """One key for all panels, below them."""
    kept = selection.filters.layer_text
    label = f"excluded: not {kept} (shaded)"
    handles: list[Artist] = [
        Patch(facecolor="white", edgecolor="0.55", hatch="////", label="not scored"),
        Line2D([], [], color="black", ls="--", lw=1.2, label=label),
        Line2D([], [], color="black", marker="o", ms=3, ls="none", label="passes every filter"),
        Patch(facecolor="white", edgecolor="black", lw=2, label="chosen"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)


def _mark_passed(ax: Axes, selection: SelectionRecord) -> None:
    if not selection.passed:
        return
    rows, cols = np.nonzero(np.array(selection.passed, dtype=bool))
    ax.scatter(cols, rows, s=6, c="black", marker="o", linewidths=0, zorder=4)


def _chosen_cell(selection: SelectionRecord) -> tuple[int, int] | None:
    chosen = selection.chosen
    if chosen is None or chosen.position not in selection.positions:
        return None
    if chosen.layer not in selection.layers:
        return None
    return selection.positions.index(chosen.position), selection.layers.index(chosen.layer)


def _mark_chosen(ax: Axes, selection: SelectionRecord) -> None:
    cell = _chosen_cell(selection)
    if cell is None:
        return
    row, col = cell
    frame = Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", lw=2, zorder=5)
    frame.set_path_effects([patheffects.withStroke(linewidth=4.5, foreground="white")])
    ax.add_patch(frame)


def _chosen_suffix(selection: SelectionRecord, key: str) -> str:
    value = getattr(selection.chosen, key) if selection.chosen is not None else None
    return "" if value is None else f"   (chosen: {value:.3g})"


def _label_axes(ax: Axes, selection: SelectionRecord) -> None:
    positions, layers = selection.positions, selection.layers
    ax.set_yticks(range(len(positions)), [str(p) for p in positions], fontsize=7)
    ax.set_ylabel("position", fontsize=8)
    step = max(1, math.ceil(len(layers) / 40))
    ticks = list(range(0, len(layers), step))
    ax.set_xticks(ticks, [str(layers[i]) for i in ticks], fontsize=7)
    ax.tick_params(length=2)


def _colorbar_marks(bar: Colorbar, selection: SelectionRecord, key: str) -> None:
    """Reference lines on the colour bar: the baseline score, and the KL threshold."""
    reference = {
        "bypass": selection.baseline.harmful_val,
        "induce": selection.baseline.harmless_val,
        "kl": selection.filters.kl_max,
    }[key]
    low, high = bar.norm.vmin, bar.norm.vmax
    if low is not None and high is not None and low <= reference <= high:
        bar.ax.axhline(reference, color="black", lw=1.5)
    label = "baseline" if key != "kl" else "kl_max"
    bar.ax.set_title(f"{label}\n{reference:g}", fontsize=7)


# --------------------------------------------------------------------------- refusal bars


def refusal_bars(metrics: MetricsRecord) -> Figure:
    """Refusal score (and safety score if judged) per condition, harmful and harmless."""
    fig = Figure(figsize=(8.0, 3.0), dpi=DPI)
    fig.subplots_adjust(left=0.085, right=0.985, bottom=0.1, top=0.84, wspace=0.06)
    harmful_ax, harmless_ax = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    harmful = metrics.harmful
    series = [("refusal score", harmful.refusal_score.model_dump(), REFUSAL_COLOR)]
    if harmful.safety_score is not None:
        series.append(("safety score", harmful.safety_score.model_dump(), SAFETY_COLOR))
    harmful_coeff = metrics.coefficients.harmful_actadd
    harmless_coeff = metrics.coefficients.harmless_actadd
    _bar_panel(harmful_ax, series, ("baseline", "ablation", "actadd"), f"{harmful_coeff:+g}")
    harmful_ax.set_title("harmful prompts", fontsize=10)
    harmful_ax.set_ylabel("fraction of prompts", fontsize=9)
    harmless = metrics.harmless.refusal_score.model_dump()
    conditions = ("baseline", "actadd")
    _bar_panel(
        harmless_ax,
        [("refusal score", harmless, REFUSAL_COLOR)],
        conditions,
        f"{harmless_coeff:+g}",
    )
    harmless_ax.set_title("harmless prompts", fontsize=10)
    if len(series) > 1:
        handles = [Patch(color=color, label=label) for label, _, color in series]
        fig.legend(handles=handles, fontsize=8, loc="upper right", ncol=2, frameon=False)
    else:
        harmful_ax.set_ylabel("refusal score (fraction refused)", fontsize=9)
    return fig


def _bar_panel(
    ax: Axes,
    series: Sequence[tuple[str, dict[str, float], str]],
    conditions: Sequence[str],
    coeff: str,
) -> None:
    present = list(conditions)
    width = min(0.6, 0.8 / len(series))
    for i, (_, scores, color) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(present))]
        heights = [scores[c] for c in present]
        bars = ax.bar(xs, heights, width=width * 0.95, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    labels = [CONDITION_LABELS[c] + (f" ({coeff})" if c == "actadd" else "") for c in present]
    ax.set_xticks(range(len(present)), labels, fontsize=8)
    ax.set_ylim(0.0, 1.15)
    ax.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
    ax.tick_params(labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)


# --------------------------------------------------------------------------- cosine curves


def cosine_to_candidates(candidates: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """[P, L+1] cosine similarity of every candidate with ``direction``; ``nan`` where a
    candidate is zero."""
    cands = np.asarray(candidates, dtype=np.float64)
    unit = np.asarray(direction, dtype=np.float64)
    unit = unit / np.linalg.norm(unit)
    norms = np.linalg.norm(cands, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (cands @ unit) / norms
    return np.where(norms > 0, cosine, np.nan)


def cosine_curves(
    candidates: np.ndarray, direction: np.ndarray, chosen_layer: int, chosen_position: int
) -> Figure:
    """Cosine similarity between the chosen direction and the candidates at every layer
    (``candidates`` is [P, L+1, d]; one line per post-instruction position)."""
    cosine = cosine_to_candidates(candidates, direction)
    n_positions, n_points = cosine.shape
    positions = list(range(-n_positions, 0))
    fig = Figure(figsize=(8.0, 3.2), dpi=DPI)
    fig.subplots_adjust(left=0.085, right=0.8, bottom=0.15, top=0.9)
    ax = fig.subplots()
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, n_positions))
    for row, (position, color) in enumerate(zip(positions, colors, strict=True)):
        chosen = position == chosen_position
        ax.plot(
            range(n_points),
            cosine[row],
            color=color,
            lw=2.2 if chosen else 1.2,
            marker="o",
            ms=2.5,
            label=f"position {position}" + (" (chosen)" if chosen else ""),
        )
    ax.axvline(chosen_layer, color=CHOSEN_COLOR, lw=1.2, ls="--")
    if chosen_position in positions and 0 <= chosen_layer < n_points:
        value = cosine[positions.index(chosen_position), chosen_layer]
        ax.plot([chosen_layer], [value], marker="*", ms=13, color=CHOSEN_COLOR, zorder=5)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlim(-0.5, n_points - 0.5)
    lowest = np.nanmin(cosine) if np.isfinite(cosine).any() else 0.0
    ax.set_ylim(min(-0.05, float(lowest) - 0.05), 1.05)
    ax.set_xlabel("layer (residual stream input; the last is the final layer's output)", fontsize=9)
    ax.set_ylabel("cosine similarity", fontsize=9)
    ax.set_title(
        f"Cosine similarity with the chosen direction (layer {chosen_layer}, "
        f"position {chosen_position})",
        fontsize=10,
    )
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


# --------------------------------------------------------------------------- comparison of runs

CONDITION_COLORS = {"baseline": "#636363", "ablation": "#2166ac", "actadd": "#b2182b"}


def comparison_bars(runs: Sequence[tuple[str, MetricsRecord]]) -> Figure:
    """The paper's cross-model bars, one group per run (``runs``: label, metrics.json): refusal
    on harmful prompts under baseline, ablation and activation addition; the safety score the
    same way when any run was judged; refusal on harmless prompts, baseline and activation
    addition. A score a run lacks is left out of its group."""
    panels: list[tuple[str, str, str, Sequence[str]]] = [
        ("harmful", "refusal_score", "harmful prompts: refusal score", CONDITIONS)
    ]
    if any(m.harmful.safety_score is not None for _, m in runs):
        panels.append(("harmful", "safety_score", "harmful prompts: safety score", CONDITIONS))
    panels.append(
        ("harmless", "refusal_score", "harmless prompts: refusal score", ("baseline", "actadd"))
    )
    width = max(8.0, 1.6 + 0.75 * len(runs))
    height = 1.0 + 1.9 * len(panels)
    fig = Figure(figsize=(width, height), dpi=DPI)
    fig.subplots_adjust(
        left=0.7 / width,
        right=1 - 0.2 / width,
        bottom=0.6 / height,
        top=1 - 0.55 / height,
        hspace=0.45,
    )
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (kind, key, title, conditions) in zip(axes, panels, strict=True):
        bar_width = 0.8 / len(conditions)
        for j, condition in enumerate(conditions):
            xs, heights = [], []
            for i, (_, metrics) in enumerate(runs):
                scores = getattr(getattr(metrics, kind), key)
                value = getattr(scores, condition) if scores is not None else None
                if value is not None:
                    xs.append(i + (j - (len(conditions) - 1) / 2) * bar_width)
                    heights.append(float(value))
            bars = ax.bar(xs, heights, bar_width * 0.95, color=CONDITION_COLORS[condition])
            if len(runs) <= 8:
                ax.bar_label(bars, fmt="%.2f", fontsize=6.5, padding=1)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylim(0.0, 1.15)
        ax.set_yticks([0.0, 0.5, 1.0])
        ax.tick_params(labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1].set_xticks(range(len(runs)), [label for label, _ in runs], fontsize=8)
    if len(runs) > 4:
        for tick in axes[-1].get_xticklabels():
            tick.set_rotation(25)
            tick.set_horizontalalignment("right")
    handles = [Patch(color=c, label=CONDITION_LABELS[k]) for k, c in CONDITION_COLORS.items()]
    fig.legend(handles=handles, fontsize=8, loc="upper right", ncol=3, frameon=False)
    fig.suptitle("Refusal across runs", fontsize=11, fontweight="bold", x=0.7 / width, ha="left")
    return fig


# --------------------------------------------------------------------------- projections


def projection_curves(
    harmful_mean: np.ndarray, harmless_mean: np.ndarray, direction: np.ndarray, chosen_layer: int
) -> Figure:
    """Mean projection of the harmful and harmless training prompts' residual stream (each
    [L+1, d], at one position) onto the unit ``direction``, per layer."""
    unit = np.asarray(direction, dtype=np.float64)
    unit = unit / np.linalg.norm(unit)
    harmful = np.asarray(harmful_mean, dtype=np.float64) @ unit
    harmless = np.asarray(harmless_mean, dtype=np.float64) @ unit
    layers = np.arange(len(harmful))
    fig = Figure(figsize=(8.0, 3.0), dpi=DPI)
    fig.subplots_adjust(left=0.085, right=0.8, bottom=0.16, top=0.89)
    ax = fig.subplots()
    ax.plot(layers, harmful, color=REFUSAL_COLOR, marker="o", ms=2.5, lw=1.6, label="harmful")
    ax.plot(layers, harmless, color=SAFETY_COLOR, marker="o", ms=2.5, lw=1.6, label="harmless")
    ax.fill_between(layers, harmless, harmful, color="0.85", zorder=0, label="difference")
    ax.axvline(chosen_layer, color=CHOSEN_COLOR, lw=1.2, ls="--", label="chosen layer")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_xlabel("layer (residual stream input; the last is the final layer's output)", fontsize=9)
    ax.set_ylabel("projection", fontsize=9)
    ax.set_title("Mean residual stream projected onto the chosen direction", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig
