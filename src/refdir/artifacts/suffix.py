"""The files of an adversarial-suffix experiment (``refdir suffix``, or the ``suffix`` step of
``refdir run`` in ``suffix/``): the suffix found and its refusal rates (``suffix.json``), the
search's objective per step (``history.json``) and the analysis (``analysis.json``)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ConfigDict, Field

from refdir.artifacts.base import Artifact, Strict

__all__ = ["SuffixAnalysis", "SuffixHistory", "SuffixRates", "SuffixRecord"]


class SuffixRates(Strict):
    model_config = ConfigDict(populate_by_name=True)

    without: float = Field(description="held-out prompts alone")
    with_: float = Field(alias="with", description="with the adversarial suffix")
    random: float = Field(description="with a random suffix of the same token length")


class SuffixPlace(Strict):
    layer: int
    position: int


class SuffixRecord(Artifact):
    """The suffix found by the search and what it does on held-out prompts."""

    FILE: ClassVar[str] = "suffix.json"
    STEP: ClassVar[str | None] = "suffix"

    suffix: str = Field(description="the best suffix seen, as text")
    token_ids: list[int] = Field(description="its token ids")
    objective: str = Field(
        description="refusal (log-odds of the refusal tokens) or target (cross-entropy of a target prefix)"
    )
    loss: float = Field(description="the objective of the best suffix")
    initial_loss: float = Field(description="the objective of the starting suffix")
    seconds: float = Field(description="wall time of the search")
    cpu_seconds: float = Field(description="process CPU time of the search")
    n_steps: int = Field(description="search steps run")
    instructions: list[str] = Field(
        description="the harmful instructions the suffix was searched on"
    )
    model: str
    refusal_token_ids: list[int] = Field(
        description="the tokens whose log-odds the refusal objective lowers"
    )
    config: dict[str, Any] = Field(description="the search's options (SuffixConfig)")
    refusal_rate: SuffixRates = Field(description="refusal rate by markers on the held-out prompts")
    random_suffix: str = Field(description="the random suffix of the control condition")
    random_token_ids: list[int]
    eval_prompts: str = Field(description="the held-out prompt set")
    n_eval: int = Field(description="held-out prompts")
    direction: SuffixPlace = Field(description="the refusal direction the analysis projects onto")

    model_config = ConfigDict(populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class SuffixHistory(Artifact):
    """The objective after each search step (index 0: the starting suffix)."""

    FILE: ClassVar[str] = "history.json"
    STEP: ClassVar[str | None] = "suffix"

    loss: list[float] = Field(description="the current suffix's objective")
    best: list[float] = Field(description="the best objective so far")


class SuffixAnalysis(Artifact):
    """How the suffix moves the residual stream along the refusal direction, measured on
    held-out prompts in three conditions (conditions first in every list)."""

    FILE: ClassVar[str] = "analysis.json"
    STEP: ClassVar[str | None] = "suffix"

    model: str
    conditions: list[str] = Field(description="alone, adversarial, random")
    suffixes: dict[str, str] = Field(description="each condition's suffix")
    direction_layer: int
    direction_position: int
    prompts: list[str] = Field(description="the held-out prompts")
    projection: list[list[float]] = Field(
        description="[C][L+1] mean projection onto the unit direction over prompts and post-instruction positions"
    )
    cosine: list[list[float]] = Field(
        description="[C][L+1] mean cosine similarity with the direction"
    )
    projection_by_position: list[list[list[float]]] = Field(
        description="[C][L+1][n_post] mean projection at each post-instruction position"
    )
    head_attribution: list[list[list[float | None]]] = Field(
        description="[C][L][H] mean direct attribution of each head's output to the direction at the last position (null in layers without attention)"
    )
    top_heads: list[list[int]] = Field(
        description="[[layer, head], ...] by attribution in the alone condition"
    )
    attention_split: list[list[list[float]]] = Field(
        description="[C][top][region] mean attention mass of the last position per region"
    )
    regions: list[str] = Field(description="instruction, suffix, template")
    refusal: dict[str, list[bool]] = Field(
        description="refusal by markers per condition and prompt"
    )
    refusal_rate: dict[str, float]
    max_new_tokens: int
    completions: dict[str, list[str]] = Field(
        default_factory=dict,
        description="empty unless asked for; each completion cut to 80 characters",
    )

    @property
    def n_layers(self) -> int:
        return len(self.projection[0]) - 1
