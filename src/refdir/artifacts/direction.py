"""``direction.json``: a direction's layer, position and provenance, beside its vector in
``direction.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from refdir.artifacts.base import Artifact

__all__ = ["DirectionRecord"]


class DirectionRecord(Artifact):
    """What :class:`refdir.directions.direction.Direction` saves beside its vector."""

    FILE: ClassVar[str] = "direction.json"
    STEP: ClassVar[str | None] = "select"
    SORT_KEYS: ClassVar[bool] = True
    OMIT: ClassVar[frozenset[str]] = frozenset({"model_signature"})

    layer: int = Field(
        ge=0,
        description="the residual stream input of this decoder layer (n_layers: the last layer's output)",
    )
    position: int = Field(
        description="post-instruction position counted back from the last prompt token (-1: the last)"
    )
    model: str = Field("unknown", description="the model it was extracted from")
    revision: str | None = Field(None, description="the model's revision, where known")
    harmful: str | None = Field(
        None, description="the harmful prompt set of the difference of means"
    )
    harmless: str | None = Field(None, description="the harmless prompt set")
    n_harmful: int | None = Field(None, description="harmful prompts the mean is over")
    n_harmless: int | None = Field(None, description="harmless prompts the mean is over")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="how it was chosen: the selection rule and its scores"
    )
    norm: float | None = Field(None, description="the vector's norm (informational)")
    d_model: int | None = Field(None, description="the vector's size (informational)")
    model_signature: list[float] | None = Field(
        None,
        description="norms of a spread of the source model's unembedding rows: a model whose "
        "differ is refused (none in a file of 0.1.0)",
    )

    @classmethod
    def fix(cls, folder: Path) -> str:
        return "save the direction again (in a run folder: `force='select'`)"

    @field_validator("position")
    @classmethod
    def _counts_back(cls, value: int) -> int:
        if value >= 0:
            raise ValueError(
                f"'position' counts back from the last token (-1, -2, ...), not {value}"
            )
        return value
