"""The difference-of-means candidates at every post-instruction position and layer, from
which a direction is chosen; saved as one safetensors file with its provenance as metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.io import atomic_path

__all__ = ["CANDIDATES_FILE", "Candidates"]

CANDIDATES_FILE = "candidates.safetensors"
_MAKE = (
    "make them with extract_candidates and Candidates.save (the command line's "
    "`refdir extract` does)"
)


@dataclass(frozen=True)
class Candidates:
    """Difference-of-means candidates at every post-instruction position and layer.

    ``harmful_mean`` and ``harmless_mean`` are float64 [P, L+1, d]; ``positions`` are the
    negative positions of the P rows (``-P .. -1``). ``harmful_prompts`` and
    ``harmless_prompts``, when known, are the prompts the means are over (after any filter).
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    model: str
    revision: str | None = None
    harmful: str | None = None
    harmless: str | None = None
    n_harmful: int = 0
    n_harmless: int = 0
    harmful_prompts: list[str] | None = None
    harmless_prompts: list[str] | None = None
    model_signature: tuple[float, ...] | None = None
    """The signature of the model the means are of (:func:`refdir.model.layout.model_signature`),
    which its directions carry."""

    @property
    def diffs(self) -> torch.Tensor:
        """[P, L+1, d] mean(harmful) - mean(harmless), float64."""
        return self.harmful_mean - self.harmless_mean

    @property
    def positions(self) -> list[int]:
        n = int(self.harmful_mean.shape[0])
        return list(range(-n, 0))

    @property
    def n_layers(self) -> int:
        """Number of decoder layers (the tensors hold one more: the last layer's output)."""
        return int(self.harmful_mean.shape[1]) - 1

    def direction(self, position: int, layer: int, **metadata: Any) -> Direction:
        """The candidate at a negative ``position`` and a ``layer`` in ``0..n_layers``."""
        if position not in self.positions:
            raise RefdirError(
                f"position {position} is not one of the post-instruction positions {self.positions}"
            )
        if not 0 <= layer <= self.n_layers:
            raise RefdirError(f"layer {layer} is outside 0..{self.n_layers}")
        vector = self.diffs[position, layer].float()
        return Direction(
            vector,
            layer,
            position,
            self.model,
            self.revision,
            self.harmful,
            self.harmless,
            self.n_harmful,
            self.n_harmless,
            dict(metadata),
            self.model_signature,
        )

    def save(self, path: str | Path) -> Path:
        meta = {
            "model": self.model,
            "revision": self.revision,
            "harmful": self.harmful,
            "harmless": self.harmless,
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
            "harmful_prompts": self.harmful_prompts,
            "harmless_prompts": self.harmless_prompts,
            "model_signature": list(self.model_signature) if self.model_signature else None,
        }
        tensors = {
            "candidates": self.diffs.float().contiguous(),
            "harmful_mean": self.harmful_mean.contiguous(),
            "harmless_mean": self.harmless_mean.contiguous(),
        }
        target = Path(path)
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata={"refdir": json.dumps(meta)})
        return target

    @classmethod
    def load(cls, path: str | Path, fix: str = _MAKE) -> Candidates:
        """Load from a folder or its ``candidates.safetensors``; ``fix``: how to make them
        again, the end of the one-line error for a missing or damaged file."""
        path = Path(path)
        if path.is_dir():
            path = path / CANDIDATES_FILE
        if not path.exists():
            raise RefdirError(f"no candidates at {path}; {fix}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("refdir", "{}"))
                if meta.get("model_signature") is not None:
                    meta["model_signature"] = tuple(meta["model_signature"])
                harmful, harmless = f.get_tensor("harmful_mean"), f.get_tensor("harmless_mean")
            return cls(harmful, harmless, **meta)
        except Exception as exc:  # safetensors and json raise errors of their own
            raise RefdirError(
                f"{path} is not a candidates file written by refdir ({exc}); {fix}"
            ) from None
