"""The file of a monitor study (``refdir monitor --out``, or the ``suffix`` step of ``refdir
run`` in ``suffix/``): how well the projection onto the refusal direction, and a logistic
probe on the same activations, tell held-out harmful prompts from harmless ones, plain and
under a suffix attack (``monitor.json``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from refdir.artifacts.base import Artifact, Strict

__all__ = ["MonitorCell", "MonitorCurve", "MonitorRecord", "RocPoints"]


class MonitorCell(Strict):
    """One scorer on one condition at the monitor's layer, with bootstrap intervals."""

    scorer: str = Field(description="direction (projection) or probe (logistic regression)")
    condition: str = Field(description="plain, adversarial or random")
    auroc: float
    auroc_low: float = Field(description="2.5th percentile of the bootstrap")
    auroc_high: float = Field(description="97.5th percentile of the bootstrap")
    tpr_at_1pct_fpr: float = Field(
        description="harmful prompts flagged at the threshold that flags at most 1% of harmless"
    )
    tpr_low: float
    tpr_high: float


class MonitorCurve(Strict):
    """One scorer on one condition at every layer (index: the residual stream's input of that
    layer; the last: the last layer's output)."""

    scorer: str
    condition: str
    auroc: list[float]
    tpr_at_1pct_fpr: list[float]


class RocPoints(Strict):
    """The ROC curve of one scorer on one condition at the monitor's layer."""

    scorer: str
    condition: str
    fpr: list[float]
    tpr: list[float]


class MonitorRecord(Artifact):
    """The monitor's table, its per-layer curves and its ROC curves."""

    FILE: ClassVar[str] = "monitor.json"
    STEP: ClassVar[str | None] = "suffix"

    model: str
    layer: int = Field(description="the layer whose input the monitor reads")
    position: int = Field(description="the post-instruction position it reads (negative)")
    chosen_by: str = Field(
        description="given (by the user), validation (best AUROC on the validation prompts) "
        "or direction (the direction's own layer and position)"
    )
    direction_layer: int
    direction_position: int
    harmful: str = Field(description="the held-out harmful prompt set")
    harmless: str = Field(description="the held-out harmless prompt set")
    n_harmful: int
    n_harmless: int
    n_train_harmful: int = Field(description="harmful prompts the probe is trained on")
    n_train_harmless: int
    n_val_harmful: int = Field(description="harmful prompts the layer was chosen on (0: none)")
    n_val_harmless: int
    suffixes: dict[str, str] = Field(
        description="each condition's suffix, appended to the held-out harmful prompts only"
    )
    n_bootstrap: int
    max_fpr: float = Field(description="the false-positive rate of tpr_at_1pct_fpr")
    table: list[MonitorCell]
    curves: list[MonitorCurve]
    roc: list[RocPoints]
    seconds: float = Field(description="wall time of the study (activations, probe, bootstrap)")

    def cell(self, scorer: str, condition: str) -> MonitorCell:
        """The table's entry of one scorer and condition."""
        return next(c for c in self.table if c.scorer == scorer and c.condition == condition)

    def curve(self, scorer: str, condition: str) -> MonitorCurve:
        return next(c for c in self.curves if c.scorer == scorer and c.condition == condition)

    @property
    def conditions(self) -> list[str]:
        return list(dict.fromkeys(c.condition for c in self.table))
