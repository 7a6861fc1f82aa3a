"""``refdir_manifest.json``: what an orthogonalized checkpoint is and how close it is to hook
ablation, written into the exported folder."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from refdir.artifacts.base import Artifact, Strict

__all__ = ["ExportManifest", "ManifestDirection"]


class ManifestDirection(Strict):
    layer: int
    position: int
    norm: float


class ExportManifest(Artifact):
    """The manifest of an exported, orthogonalized checkpoint."""

    FILE: ClassVar[str] = "refdir_manifest.json"
    OMIT: ClassVar[frozenset[str]] = frozenset({"edit", "format", "gguf_type", "rank"})

    refdir_manifest: Literal[1] = Field(1, description="the manifest's format")
    format: Literal["lora", "gguf"] | None = Field(
        None,
        description="lora: a PEFT adapter on the unedited base; gguf: the edited model as one "
        "GGUF file; absent: the edited checkpoint as safetensors",
    )
    rank: int | None = Field(None, description="for a LoRA adapter: its rank (the edit's k)")
    gguf_type: str | None = Field(
        None, description="for GGUF: the tensor type written (F32, F16, Q8_0, ... or source)"
    )
    source_model: str = Field(description="the model that was edited")
    source_revision: str | None = Field(description="its revision, where known")
    direction: ManifestDirection = Field(description="the direction removed from the weights")
    exact: bool = Field(
        description="whether the edited weights equal hook ablation to float precision"
    )
    untied_embeddings: bool = Field(
        description="whether a tied unembedding was untied so that the logits keep their read-out"
    )
    edited_tensors: int = Field(description="weights and biases edited")
    note: str = Field(description="why the edit is exact or approximate")
    residual_left: float | None = Field(
        description="the most any layer of the edited model still writes along the direction (rounding in a correct edit)"
    )
    parity_max_abs_logit_delta: float = Field(
        description="max |logit difference| against hook ablation on probe prompts"
    )
    parity_dtype: str = Field(description="the dtype the parity was measured in")
    edit: dict[str, float | int | bool | str] | None = Field(
        None,
        description="for a weighted edit (refdir optimize): its parameters, k and whether it is "
        "norm-preserving; the direction is then its first basis vector (edit.safetensors holds "
        "the whole edit), and parity is against the edit's hooks",
    )

    @property
    def kind(self) -> Literal["safetensors", "lora", "gguf"]:
        """The export's format, ``safetensors`` where the file names none."""
        return self.format or "safetensors"
