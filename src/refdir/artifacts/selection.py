"""``selection.json``: the paper's scores of every candidate direction, the filters, the pick
and the rule used, and the validation prompts the scores are over."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from refdir.artifacts.base import Artifact, Strict

__all__ = ["LAYER_RULES", "Chosen", "Kept", "SelectionRecord", "layer_bound", "layer_rule_text"]

Grid = list[list[float | None]]

LAYER_RULES: dict[str, str] = {
    "fraction": "layer < {f} L",
    "floor": "layer < int({f} L)",
}
"""The layer filter's readings: ``fraction``, the paper's text and refdir's default, and
``floor``, the paper's code (``layer >= int(0.8 * n_layer)`` is discarded there)."""


def layer_bound(n_layers: int, fraction: float, rule: str) -> float:
    """The layer filter keeps the layers below this bound."""
    return float(int(n_layers * fraction)) if rule == "floor" else fraction * n_layers


def layer_rule_text(fraction: float, rule: str) -> str:
    """The layer filter in words, e.g. ``layer < int(0.8 L)``."""
    return LAYER_RULES[rule].format(f=f"{fraction:g}")


class Baseline(Strict):
    harmful_val: float = Field(
        description="mean refusal log-odds on harmful_val without intervention"
    )
    harmless_val: float = Field(description="the same on harmless_val")


class Filters(Strict):
    OMIT: ClassVar[frozenset[str]] = frozenset({"layer_rule", "epsilons"})

    kl_max: float
    induce_min: float
    max_layer_fraction: float
    layer_rule: str | None = Field(
        None,
        description="fraction (null too): layer < max_layer_fraction x L; floor: layer < "
        "int(max_layer_fraction x L), the paper's code",
    )
    epsilons: bool | None = Field(
        None, description="scored with the paper's code's epsilons (null: without)"
    )
    fallback_kl_bounds: list[float]

    @property
    def layer_text(self) -> str:
        return layer_rule_text(self.max_layer_fraction, self.layer_rule or "fraction")

    def layer_bound(self, n_layers: int) -> float:
        return layer_bound(n_layers, self.max_layer_fraction, self.layer_rule or "fraction")


class Chosen(Strict):
    position: int
    layer: int
    bypass: float | None = Field(
        description="null: not scored (a hand pick the pruned scoring left out)"
    )
    induce: float | None
    kl: float | None


class Kept(Strict):
    """Prompts of a set sampled, and kept by the refusal-metric filter."""

    sampled: int
    kept: int


class ValidationPrompts(Strict):
    harmful_val: list[str]
    harmless_val: list[str]


class ValidationCounts(Strict):
    harmful_val: Kept
    harmless_val: Kept


class Validation(Strict):
    prompts: ValidationPrompts = Field(
        description="the validation prompts kept by the refusal-metric filter"
    )
    filter: ValidationCounts


class SelectionRecord(Artifact):
    """Scores over [positions, layers]; null marks a score not computed."""

    FILE: ClassVar[str] = "selection.json"
    STEP: ClassVar[str | None] = "select"

    positions: list[int] = Field(
        description="post-instruction positions, counted back from the last token"
    )
    layers: list[int]
    bypass: Grid = Field(
        description="mean refusal log-odds on harmful_val, candidate ablated everywhere"
    )
    induce: Grid = Field(
        description="mean refusal log-odds on harmless_val, candidate added at its layer"
    )
    kl: Grid = Field(
        description="mean KL(baseline || ablated) of the last-position distribution on harmless_val"
    )
    baseline: Baseline
    filters: Filters
    rule: str = Field(description="how the direction was chosen")
    passed: list[list[bool]] = Field(description="candidates that pass every filter of the paper")
    fallback: bool | None = Field(
        description="whether the fallback rule picked it (null: nothing was picked)"
    )
    n_candidates: int = Field(
        description="candidates below the layer filter with a non-zero difference of means"
    )
    n_passed: int
    chosen: Chosen | None = Field(description="null when no candidate could be picked")
    validation: Validation
