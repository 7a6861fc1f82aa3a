"""``pareto.json``: what ``refdir optimize`` found: every point of the refusals-versus-KL front
with its parameters and its measures, the paper's own selection measured the same way, and the
point chosen for export."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from refdir.artifacts.base import Artifact, Strict

__all__ = ["Agreement", "FrontPoint", "HeldoutRecord", "HeldoutResult", "ParetoRecord"]

Param = float | int | bool | str


class FrontPoint(Strict):
    """One edit, measured on the validation prompts."""

    trial: int | None = Field(description="the Optuna trial number (null: not a trial)")
    label: str = Field(description="what the point is: a trial, or a reference edit")
    params: dict[str, Param] = Field(description="the search parameters of the edit")
    refusal_score: float = Field(
        description="cheap refusal score: mean probability of the refusal tokens at the first "
        "response position on harmful_val (one forward pass), the search's first objective"
    )
    refusal_first_token: float = Field(
        description="share of harmful_val prompts whose refusal log-odds at the first response "
        "position is above 0"
    )
    kl: float = Field(
        description="mean KL(original || edited) of the next token at the last prompt position "
        "on harmless_val, the search's second objective"
    )
    refusal_generated: float | None = Field(
        description="share of harmful_val prompts refused (greedy generation, refusal markers)"
    )
    ce_text: float | None = Field(description="cross-entropy on the text corpus, nats/token")


class Agreement(Strict):
    """How well the cheap score stands for generated refusals on the front."""

    n: int = Field(description="front points confirmed by generation")
    mean_abs_difference: float = Field(
        description="mean |refusal_first_token - refusal_generated| over them"
    )
    rank_correlation: float | None = Field(
        description="Spearman correlation of refusal_score and refusal_generated (null: constant)"
    )
    same_side: float = Field(
        description="share of points on which both rates agree about the 2% target "
        "(both at most 0.02, or both above)"
    )


class ParetoRecord(Artifact):
    """The front of one optimization."""

    FILE: ClassVar[str] = "pareto.json"
    STEP: ClassVar[str | None] = None

    model: str
    methods: list[str] = Field(description="the edit methods searched over")
    storage: str = Field(description="the Optuna storage of the study")
    study: str = Field(description="the study's name in that storage")
    trials: int = Field(description="completed trials in the study")
    search_seconds: float = Field(description="wall time of this command's trials")
    trial_seconds: float = Field(description="median wall time of one of this command's trials")
    position: int = Field(description="the post-instruction position the directions are taken at")
    refusal_tokens: list[str] = Field(
        default_factory=list,
        description="the tokens whose probability the cheap refusal score sums: the run's "
        "refusal tokens and the first tokens of the partly edited model's refusals",
    )
    ce_baseline: float | None = Field(description="the unedited model's cross-entropy on the text")
    paper: FrontPoint = Field(
        description="the paper's selected direction, ablated at full strength"
    )
    points: list[FrontPoint] = Field(description="the Pareto front, by increasing KL")
    agreement: Agreement
    rule: str = Field(description="how the exported point was chosen")
    chosen: int = Field(description="index in `points` of the exported point")


class HeldoutResult(Strict):
    """One edit on the held-out prompts."""

    label: str
    refusal_harmful: float = Field(description="refusal rate on the held-out harmful prompts")
    refusal_harmful_long: float | None = Field(
        description="the same with the longer generation (null: not measured)"
    )
    refusal_harmless: float = Field(description="refusal rate on the held-out harmless prompts")
    kl_mean: float = Field(description="mean KL(original || edited), last prompt position")
    kl_median: float
    ce_text: float = Field(description="cross-entropy on the text corpus, nats/token")
    ce_own_completions: float | None = Field(
        description="cross-entropy of the unedited model's own harmless completions"
    )
    actadd_harmless_refusal: float | None = Field(
        description="refusal rate on the held-out harmless prompts with the edit's direction "
        "added at its layer (null: not measured)"
    )


class HeldoutRecord(Artifact):
    """The paper's edit and the exported one on the held-out prompts, beside the model as it is."""

    FILE: ClassVar[str] = "heldout.json"
    STEP: ClassVar[str | None] = None

    harmful_sets: list[str]
    n_harmful: int
    n_harmless: int
    max_new_tokens: int
    long_tokens: int | None
    results: list[HeldoutResult] = Field(description="none, paper, chosen")
