"""The report's part on the refusal direction as a monitor (``suffix/monitor.json``): the
table of AUROC and TPR at 1% FPR for the direction and the probe, plain and under the
suffixes, the ROC curves at the monitor's layer, and the AUROC over layers."""

from __future__ import annotations

from matplotlib.figure import Figure

from refdir.artifacts.monitor import MonitorRecord
from refdir.report.blocks import Block, Heading, Image, Para, Table
from refdir.report.figures import DPI, png_bytes

__all__ = ["LAYERS_PNG", "ROC_PNG", "layer_curves", "monitor_figures", "monitor_section", "rocs"]

ROC_PNG = "monitor_roc.png"
LAYERS_PNG = "monitor_layers.png"
_COLORS = {"plain": "#c0392b", "adversarial": "#2471a3", "random": "#7f8c8d"}
_STYLES = {"direction": "-", "probe": "--"}
_LABELS = {
    "plain": "harmful alone",
    "adversarial": "+ adversarial suffix",
    "random": "+ random suffix",
}


def _label(scorer: str, condition: str) -> str:
    return f"{scorer}, {_LABELS.get(condition, '+ ' + condition)}"


def rocs(record: MonitorRecord) -> Figure:
    """The ROC curve of each scorer and condition at the monitor's layer."""
    fig = Figure(figsize=(4.6, 4.2), dpi=DPI)
    ax = fig.add_axes((0.13, 0.12, 0.83, 0.78))
    for points in record.roc:
        ax.plot(
            points.fpr,
            points.tpr,
            _STYLES.get(points.scorer, ":"),
            color=_COLORS.get(points.condition, "#333333"),
            label=_label(points.scorer, points.condition),
            linewidth=1.3,
            drawstyle="steps-post",
        )
    ax.plot([0, 1], [0, 1], ":", color="#999999", linewidth=0.8)
    ax.axvline(record.max_fpr, color="#999999", linewidth=0.6)
    ax.set_xlabel(f"false-positive rate ({record.n_harmless} {record.harmless})", fontsize=8)
    ax.set_ylabel(f"true-positive rate ({record.n_harmful} harmful)", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6.5, loc="lower right")
    ax.set_title(f"Monitor ROC at layer {record.layer}, position {record.position}", fontsize=9)
    return fig


def layer_curves(record: MonitorRecord) -> Figure:
    """AUROC (left) and TPR at 1% FPR (right) at every layer, per scorer and condition."""
    fig = Figure(figsize=(8.0, 3.2), dpi=DPI)
    axes = [fig.add_axes((0.07, 0.15, 0.40, 0.72)), fig.add_axes((0.57, 0.15, 0.40, 0.72))]
    for ax, measure, title in zip(
        axes,
        ("auroc", "tpr_at_1pct_fpr"),
        ("AUROC", f"TPR at {record.max_fpr:.0%} FPR"),
        strict=True,
    ):
        for curve in record.curves:
            values = getattr(curve, measure)
            ax.plot(
                range(len(values)),
                values,
                _STYLES.get(curve.scorer, ":"),
                color=_COLORS.get(curve.condition, "#333333"),
                label=_label(curve.scorer, curve.condition),
                linewidth=1.2,
                marker=".",
                markersize=3,
            )
        ax.axvline(record.layer, color="#00a651", linewidth=0.8)
        ax.set_ylim(0 if measure != "auroc" else min(0.4, ax.get_ylim()[0]), 1.02)
        ax.set_xlabel("layer (residual stream input)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[1].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Monitor by layer, position {record.position}", fontsize=10)
    return fig


def monitor_figures(record: MonitorRecord) -> dict[str, bytes]:
    """The section's figures as PNG bytes, by file name."""
    return {ROC_PNG: png_bytes(rocs(record)), LAYERS_PNG: png_bytes(layer_curves(record))}


def _interval(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def monitor_section(record: MonitorRecord) -> list[Block]:
    """The blocks of the monitor's part of the report."""
    where = {
        "given": "given",
        "validation": f"chosen by AUROC on {record.n_val_harmful} + {record.n_val_harmless} "
        "validation prompts",
        "direction": "the direction's own",
    }[record.chosen_by]
    rows = [
        [
            cell.scorer,
            _LABELS.get(cell.condition, cell.condition),
            _interval(cell.auroc, cell.auroc_low, cell.auroc_high),
            _interval(cell.tpr_at_1pct_fpr, cell.tpr_low, cell.tpr_high),
        ]
        for cell in record.table
    ]
    figures = monitor_figures(record)
    return [
        Heading("The direction as a monitor", 3),
        Para(
            f"Each held-out prompt is scored by its projection onto the refusal direction at "
            f"layer {record.layer}, position {record.position} ({where}), in one forward pass "
            f"cut at that layer; the baseline is a logistic-regression probe on the same "
            f"activations, trained on {record.n_train_harmful} + {record.n_train_harmless} "
            "training prompts. The suffixes are appended to the harmful prompts only; the "
            "harmless ones set the threshold as they are."
        ),
        Table(
            ["scorer", "harmful prompts", "AUROC [95% CI]", "TPR at 1% FPR [95% CI]"],
            rows,
            f"{record.n_harmful} harmful ({record.harmful}) against {record.n_harmless} "
            f"harmless ({record.harmless}); {record.n_bootstrap} bootstrap resamples.",
        ),
        Image(
            f"suffix_{ROC_PNG}",
            "Monitor ROC curves",
            figures[ROC_PNG],
            "ROC curves at the monitor's layer: the direction (solid) and the probe (dashed).",
        ),
        Image(
            f"suffix_{LAYERS_PNG}",
            "Monitor by layer",
            figures[LAYERS_PNG],
            "AUROC and TPR at 1% FPR at every layer: where in depth the suffix stops fooling "
            "the monitor.",
        ),
    ]
