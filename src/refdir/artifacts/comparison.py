"""The file of ``refdir compare-directions`` (``directions.json``): two models' refusal
directions compared, by cosine per layer, by the projection of each model's activations onto
the other's direction, and by the other's direction ablated and added in each model."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from refdir.artifacts.base import Artifact, Strict

__all__ = ["CrossRates", "DirectionComparison", "DirectionSide", "SideProjections"]


class SideProjections(Strict):
    """Mean projections [L+1] of one model's held-out activations onto a unit direction."""

    harmful_own: list[float] = Field(description="harmful prompts onto the model's own direction")
    harmless_own: list[float]
    harmful_other: list[float] = Field(description="harmful prompts onto the other's direction")
    harmless_other: list[float]


class CrossRates(Strict):
    """Refusal rates (markers, greedy) of one model under its own and the other's direction."""

    harmful_baseline: float
    harmful_ablate_own: float
    harmful_ablate_other: float
    harmless_baseline: float
    harmless_add_own: float = Field(description="its own direction added at its own layer")
    harmless_add_other: float = Field(description="the other's direction added at its layer")


class DirectionSide(Strict):
    """One of the two: its direction and, with a model, what the other's direction does in it."""

    OMIT: ClassVar[frozenset[str]] = frozenset({"projections", "rates"})

    label: str
    source: str = Field(description="the run folder or direction file given")
    model: str = Field(description="the model loaded for this side")
    layer: int
    position: int
    norm: float
    projections: SideProjections | None = None
    rates: CrossRates | None = None


class DirectionComparison(Artifact):
    """Two refusal directions of models of the same width, compared."""

    FILE: ClassVar[str] = "directions.json"

    a: DirectionSide
    b: DirectionSide
    d_model: int
    cosine: float = Field(description="cosine of the two chosen direction vectors")
    position: int = Field(description="the position of the per-layer cosines")
    cosine_by_layer: list[float | None] | None = Field(
        description="cosine of the two difference-of-means candidates at every layer, at "
        "`position` (null where either is zero; the list null unless both sides have their "
        "candidates)"
    )
    harmful: str
    harmless: str
    n_harmful: int
    n_harmless: int
    max_new_tokens: int
    seconds: float
