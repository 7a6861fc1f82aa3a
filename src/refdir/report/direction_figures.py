"""The figure of ``refdir compare-directions``: the cosine of the two models' candidates at
every layer, and each model's harmful and harmless activations projected onto its own
direction and onto the other's."""

from __future__ import annotations

from matplotlib.figure import Figure

from refdir.artifacts.comparison import DirectionComparison
from refdir.report.figures import DPI

__all__ = ["COMPARISON_PNG", "comparison_figure"]

COMPARISON_PNG = "directions.png"


def comparison_figure(record: DirectionComparison) -> Figure:
    """Left: cosine per layer (when known); then one panel per side with projections."""
    sides = [s for s in (record.a, record.b) if s.projections is not None]
    n_panels = 1 + len(sides)
    fig = Figure(figsize=(3.4 * n_panels, 3.2), dpi=DPI)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.82, wspace=0.3)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    ax = axes[0]
    if record.cosine_by_layer is not None:
        values = [float("nan") if c is None else c for c in record.cosine_by_layer]
        ax.plot(range(len(values)), values, ".-", color="#333")
    for s, color in ((record.a, "#c0392b"), (record.b, "#2471a3")):
        ax.axvline(s.layer, color=color, linewidth=0.8, label=f"{s.label}'s layer")
    ax.axhline(record.cosine, color="#999", linestyle=":", label="chosen vectors")
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.02)
    ax.set_title(f"cosine per layer (position {record.position})", fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)
    for ax, s in zip(axes[1:], sides, strict=True):
        other = record.b if s is record.a else record.a
        p = s.projections
        assert p is not None
        for values, style, color, name in (
            (p.harmful_own, "-", "#c0392b", "harmful, own"),
            (p.harmless_own, "-", "#2471a3", "harmless, own"),
            (p.harmful_other, "--", "#c0392b", f"harmful, {other.label}'s"),
            (p.harmless_other, "--", "#2471a3", f"harmless, {other.label}'s"),
        ):
            ax.plot(range(len(values)), values, style, color=color, label=name, linewidth=1.1)
        ax.set_title(f"{s.label}: projection onto each direction", fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{record.a.label} against {record.b.label}", fontsize=10)
    return fig
