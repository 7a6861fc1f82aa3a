"""The Direction value: a vector with its layer, position and provenance, saved as
safetensors plus JSON (``direction.json``, :class:`refdir.artifacts.direction.DirectionRecord`),
never pickle."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from refdir.artifacts.base import read_json_object
from refdir.artifacts.direction import DirectionRecord
from refdir.errors import RefdirError, one_line
from refdir.io import atomic_path, write_text
from refdir.model.layout import ModelLayout, model_signature

__all__ = ["DIRECTION_FILE", "DIRECTION_JSON", "Direction"]

DIRECTION_FILE = "direction.safetensors"
DIRECTION_JSON = "direction.json"
_SAVE = "save one with Direction.save (the command line's `refdir extract` does)"
_SIGNATURE_TOLERANCE = 0.02
"""A model's signature, in another dtype or after refdir's weight edits, stays within 2%; two
different models' rows differ far more."""


@dataclass(frozen=True)
class Direction:
    """A candidate refusal direction: the raw difference of means at one layer and position.

    ``layer`` indexes the residual stream *input* of that decoder layer (``n_layers`` is the
    output of the last one); ``position`` is negative, counted back from the end of the prompt
    over the post-instruction tokens (-1 is the last token).
    """

    vector: torch.Tensor
    layer: int
    position: int
    model: str
    revision: str | None = None
    harmful: str | None = None
    harmless: str | None = None
    n_harmful: int | None = None
    n_harmless: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    model_signature: tuple[float, ...] | None = None
    """The signature of the model it was extracted from (:func:`refdir.model.layout.
    model_signature`): applied to a model whose signature differs, it is refused."""

    def __post_init__(self) -> None:
        if self.vector.dim() != 1:
            raise RefdirError(
                f"a direction is one vector; got shape {tuple(self.vector.shape)}: give a 1-D "
                "tensor of the model's d_model values (one candidate, not the candidates)"
            )
        if not torch.isfinite(self.vector).all() or float(self.vector.norm()) == 0.0:
            raise RefdirError(
                "the direction vector is zero or not finite; pick another layer or position"
            )
        if not torch.isfinite(self.vector.float().norm()):
            raise RefdirError(
                f"the direction's norm ({self.norm:.3g}) overflows float32, in which it is "
                "applied; rescale the vector"
            )

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.double().norm())

    def unit(self) -> torch.Tensor:
        """The unit vector, float32."""
        v = self.vector.double()
        return (v / v.norm()).float()

    def check(self, d_model: int, n_layers: int | None = None) -> None:
        """Refuse a direction that does not fit a model."""
        if self.d_model != d_model:
            raise RefdirError(
                f"direction has size {self.d_model} but the model's residual stream has {d_model}; "
                "extract a direction from this model"
            )
        if n_layers is not None and not 0 <= self.layer <= n_layers:
            raise RefdirError(
                f"direction layer {self.layer} is outside 0..{n_layers} for this model; "
                "extract a direction from this model"
            )

    def fits(self, layout: ModelLayout) -> None:
        """Refuse to apply this direction to a model it does not fit: another width, a layer
        the model lacks, or another model of the same width (its signature differs; see
        :meth:`for_any_model`)."""
        self.check(layout.d_model, layout.n_layers)
        if self.model_signature is None:
            return
        here = model_signature(layout)
        if len(here) != len(self.model_signature) or any(
            abs(a - b) > _SIGNATURE_TOLERANCE * max(abs(b), 1e-12)
            for a, b in zip(self.model_signature, here, strict=True)
        ):
            raise RefdirError(
                f"the direction was extracted from {self.model}, another model of this width "
                "(their unembeddings differ); extract a direction from this model, or apply it "
                "anyway with `any_model=True`"
            )

    def for_any_model(self) -> Direction:
        """This direction without its model's signature: applied to any model of its width."""
        return replace(self, model_signature=None)

    def record(self) -> DirectionRecord:
        """What ``direction.json`` holds of this direction."""
        return DirectionRecord(
            layer=self.layer,
            position=self.position,
            model=self.model,
            revision=self.revision,
            harmful=self.harmful,
            harmless=self.harmless,
            n_harmful=self.n_harmful,
            n_harmless=self.n_harmless,
            metadata=dict(self.metadata),
            norm=self.norm,
            d_model=self.d_model,
            model_signature=list(self.model_signature) if self.model_signature else None,
        )

    def save(self, path: str | Path) -> Path:
        """Write ``direction.safetensors`` and ``direction.json`` (into ``path`` if it is a
        folder, else beside the given ``.safetensors`` path). Returns the tensor file."""
        tensor_path, json_path = _paths(Path(path))
        try:  # fails before anything is written
            text = self.record().text()
        except (TypeError, ValueError) as exc:
            raise RefdirError(f"the direction's metadata is not JSON ({exc})") from None
        with atomic_path(tensor_path) as tmp:
            save_file({"direction": self.vector.detach().float().cpu().contiguous()}, str(tmp))
        write_text(json_path, text)
        return tensor_path

    @classmethod
    def load(cls, path: str | Path, fix: str = _SAVE, any_model: bool = False) -> Direction:
        """Load from a folder, the ``.safetensors`` file or the ``.json`` file; ``fix``: how to
        make it again, the end of the one-line error for a missing or damaged file;
        ``any_model``: without the signature of its model (:meth:`for_any_model`)."""
        tensor_path, json_path = _paths(Path(path))
        if not tensor_path.exists():
            raise RefdirError(f"no direction at {path}: {tensor_path.name} is missing; {fix}")
        try:
            vector = load_file(str(tensor_path))["direction"]
        except KeyError:
            raise RefdirError(f"{tensor_path} holds no tensor named 'direction'; {fix}") from None
        except Exception as exc:  # safetensors raises errors of its own (quoting the header)
            raise RefdirError(
                f"{tensor_path} is not a safetensors file ({one_line(str(exc))}); {fix}"
            ) from None
        if not vector.is_floating_point():
            raise RefdirError(f"{tensor_path} holds an integer 'direction'; save a float vector")
        info = DirectionRecord.parse(read_json_object(json_path, fix), json_path)
        return cls(
            vector,
            info.layer,
            info.position,
            info.model,
            info.revision,
            info.harmful,
            info.harmless,
            info.n_harmful,
            info.n_harmless,
            dict(info.metadata),
            tuple(info.model_signature) if info.model_signature and not any_model else None,
        )


def _paths(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        return path / DIRECTION_FILE, path / DIRECTION_JSON
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path / DIRECTION_FILE, path / DIRECTION_JSON
