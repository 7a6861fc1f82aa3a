"""``metrics.json``: the figures of a ``refdir run``: the chosen direction, refusal and safety
scores under each intervention, KL and cross-entropy, prompt counts, and where the time went."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from refdir.artifacts.base import Artifact, Strict
from refdir.artifacts.selection import Kept

__all__ = [
    "HarmfulScores",
    "HarmlessScores",
    "KlReference",
    "KlSpread",
    "MetricsRecord",
    "ThreeConditions",
]


class DirectionSummary(Strict):
    layer: int
    position: int
    norm: float


class SelectionSummary(Strict):
    rule: str
    fallback: bool | None
    n_candidates: int | None
    n_passed: int | None
    bypass: float | None
    induce: float | None
    kl: float | None


class Sizes(Strict):
    harmful_train: int = Field(description="training prompts kept by the refusal-metric filter")
    harmless_train: int
    harmful_val: int
    harmless_val: int
    filter: dict[str, Kept] = Field(description="prompts sampled and kept, per set")
    harmful_eval: dict[str, int] = Field(description="held-out harmful prompts per set")
    harmful_eval_unique: int = Field(description="held-out harmful prompts, each once")
    harmless_eval: dict[str, int]


class ThreeConditions(Strict):
    baseline: float
    ablation: float
    actadd: float


class HarmlessScores(Strict):
    baseline: float
    actadd: float


class HarmfulScores(Strict):
    OMIT: ClassVar[frozenset[str]] = frozenset({"safety_score"})

    refusal_score: ThreeConditions = Field(
        description="fraction of completions refused, by markers"
    )
    by_set: dict[str, ThreeConditions]
    safety_score: ThreeConditions | None = Field(
        None, description="fraction judged safe (with a judge)"
    )


class Group(Strict):
    n: int
    mean: float | None


class KlSpread(Strict):
    median: float
    p90: float
    max: float
    refused_at_baseline: Group
    answered_at_baseline: Group


class KlReference(Strict):
    n: int
    seed: int
    median: float
    p10: float
    p90: float
    min: float
    max: float
    below_chosen: float = Field(
        description="share of random directions whose KL is below the chosen one's"
    )


class Harmless(Strict):
    OMIT: ClassVar[frozenset[str]] = frozenset({"kl_random_directions"})

    refusal_score: HarmlessScores
    kl_ablation: float = Field(
        description="mean KL(baseline || ablation) of the last-position distribution"
    )
    kl_ablation_spread: KlSpread
    kl_random_directions: KlReference | None = Field(
        None, description="the same KL for random directions (with n_random_kl)"
    )


class Coefficients(Strict):
    harmful_actadd: float
    harmless_actadd: float


class MetricsRecord(Artifact):
    """Everything the report and ``refdir compare`` show of one run."""

    FILE: ClassVar[str] = "metrics.json"
    STEP: ClassVar[str | None] = "evaluate"
    OMIT: ClassVar[frozenset[str]] = frozenset({"timings", "timing_parts", "timing_devices"})

    model: str
    direction: DirectionSummary
    selection: SelectionSummary
    refusal_tokens: list[str]
    sizes: Sizes
    harmful: HarmfulScores
    harmless: Harmless
    ce_loss: ThreeConditions = Field(description="mean next-token cross-entropy on a text corpus")
    ce_loss_own_completions: ThreeConditions | None = Field(
        description="the same on the model's own harmless completions; null when every one of "
        "them is empty (no token to score)"
    )
    coefficients: Coefficients
    timings: dict[str, float] | None = Field(
        None, description="wall time of each step whose results are in the folder"
    )
    timing_parts: dict[str, dict[str, float]] | None = Field(
        None, description="the timed parts of the select, evaluate and suffix steps"
    )
    timing_devices: dict[str, str] | None = Field(
        None, description="the device each step ran the model on"
    )
