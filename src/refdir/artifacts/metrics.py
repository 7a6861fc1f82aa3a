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
    "LongRefusal",
    "MetricsRecord",
    "ReasoningScores",
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
    OMIT: ClassVar[frozenset[str]] = frozenset({"ablation"})

    baseline: float
    actadd: float
    ablation: float | None = Field(
        None, description="false refusals the ablation may create (null in older runs)"
    )


class LongRefusal(Strict):
    """Refusals of the harmful prompts under ablation counted on longer completions, where a
    refusal after a first sentence shows."""

    max_new_tokens: int
    ablation: float
    by_set: dict[str, float]


class ReasoningScores(Strict):
    """A reasoning model's completions (its chat template thinks): the budget they got, and
    per prompt group and condition the completions cut off inside the think block and those
    whose reasoning holds a refusal marker. Refusal rates elsewhere score the answers only."""

    max_new_tokens: int = Field(description="greedy tokens per completion (reasoning_tokens)")
    instead_of: int = Field(description="max_new_tokens, which a model without a think block gets")
    opened_by_template: bool = Field(
        description="the generation prompt opens the think block (else the model opens it)"
    )
    no_answer: dict[str, dict[str, float]] = Field(
        description="{group: {condition: fraction cut off inside the reasoning}}"
    )
    reasoning_refusal: dict[str, dict[str, float | None]] = Field(
        description="{group: {condition: fraction whose reasoning holds a refusal marker}} (null: "
        "no completion had a think block)"
    )


class HarmfulScores(Strict):
    OMIT: ClassVar[frozenset[str]] = frozenset(
        {"safety_score", "refusal_score_long", "by_category", "safety_min_words"}
    )

    refusal_score: ThreeConditions = Field(
        description="fraction of completions refused, by markers"
    )
    by_set: dict[str, ThreeConditions]
    by_category: dict[str, dict[str, ThreeConditions]] | None = Field(
        None, description="the refusal score per category, for the sets that have categories"
    )
    refusal_score_long: LongRefusal | None = Field(
        None, description="the ablation's refusal score on longer completions (long_tokens)"
    )
    safety_score: ThreeConditions | None = Field(
        None, description="fraction judged safe (with a judge)"
    )
    safety_min_words: int | None = Field(
        None, description="completions of fewer words counted safe without judging"
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
    OMIT: ClassVar[frozenset[str]] = frozenset(
        {"timings", "timing_parts", "timing_devices", "protocol", "ce_corpus", "reasoning"}
    )

    model: str
    protocol: str | None = Field(
        None, description="refdir, or paper (the paper's code's protocol); null in older runs"
    )
    direction: DirectionSummary
    selection: SelectionSummary
    refusal_tokens: list[str]
    sizes: Sizes
    harmful: HarmfulScores
    harmless: Harmless
    ce_loss: ThreeConditions = Field(description="mean next-token cross-entropy on a text corpus")
    ce_corpus: str | None = Field(
        None,
        description="the CE corpus: prose, or the local file of texts or Alpaca records (null "
        "in older runs: prose)",
    )
    ce_loss_own_completions: ThreeConditions | None = Field(
        description="the same on the model's own harmless completions; null when every one of "
        "them is empty (no token to score)"
    )
    coefficients: Coefficients
    reasoning: ReasoningScores | None = Field(
        None,
        description="a reasoning model's think blocks (null: the chat template does not think)",
    )
    timings: dict[str, float] | None = Field(
        None, description="wall time of each step whose results are in the folder"
    )
    timing_parts: dict[str, dict[str, float]] | None = Field(
        None, description="the timed parts of the select, evaluate and suffix steps"
    )
    timing_devices: dict[str, str] | None = Field(
        None, description="the device each step ran the model on"
    )
