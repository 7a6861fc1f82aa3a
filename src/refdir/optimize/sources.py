"""Where an edit's directions come from: the difference-of-means candidates of a run at one
post-instruction position, read at a fractional layer index (interpolated between the two
neighbouring layers), optionally made orthogonal to the harmless mean there ("projected"), and
optionally widened to a subspace by the top directions of the per-prompt differences; or one
direction per layer, each read at that layer; or a cone, a subspace trained by gradient
(:mod:`.cone`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from refdir.directions.candidates import Candidates
from refdir.directions.extraction import residual_rows
from refdir.errors import RefdirError
from refdir.interventions.projection import orthonormal
from refdir.model.chat_model import ChatModel

__all__ = ["DirectionSources"]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


class DirectionSources:
    """Directions at ``position`` of ``candidates`` (float64 throughout); the per-prompt
    activations a subspace needs are taken from ``cm`` on ``harmful`` prompts the first time
    one is asked for."""

    def __init__(
        self,
        candidates: Candidates,
        position: int,
        cm: ChatModel | None = None,
        harmful: Sequence[str] = (),
        batch_size: int = 32,
    ) -> None:
        if position not in candidates.positions:
            raise RefdirError(
                f"position {position} is not one of the candidates' positions "
                f"{candidates.positions}"
            )
        self.diffs = candidates.diffs[position]  # [L+1, d]
        norms = self.diffs.norm(dim=-1)
        nonzero = (norms > 1e-9 * norms.max()).nonzero()
        if nonzero.numel() == 0:
            raise RefdirError("every candidate at this position is zero; choose another position")
        self.first_layer = int(nonzero[0])
        """The first layer whose candidate is not zero (at the last position, the first
        layer's input is the same token for every prompt: its difference of means is 0)."""
        self.harmless = candidates.harmless_mean[position]
        self.position = position
        self.cm = cm
        self.harmful = list(harmful)
        self.batch_size = batch_size
        self._rows: torch.Tensor | None = None
        self.cone: Callable[[int], torch.Tensor] | None = None
        """Cones by size (:class:`~refdir.optimize.cone.ConeSource`), where the search has them."""

    @property
    def n_layers(self) -> int:
        return int(self.diffs.shape[0]) - 1

    def _at(self, table: torch.Tensor, index: float) -> torch.Tensor:
        """Unit vectors of ``table`` at the two layers around ``index``, interpolated."""
        if not self.first_layer <= index <= self.n_layers:
            raise RefdirError(
                f"direction index {index} is outside {self.first_layer}..{self.n_layers} (the "
                "layers with a candidate that is not zero)"
            )
        low = math.floor(index)
        high = min(low + 1, self.n_layers)
        frac = index - low
        if frac == 0.0:
            return _unit(table[low])
        return _unit((1 - frac) * _unit(table[low]) + frac * _unit(table[high]))

    def direction(self, index: float, projected: bool = False) -> torch.Tensor:
        """The unit refusal direction at a fractional layer ``index``, float64 [d];
        ``projected``: with its component along the harmless mean there removed."""
        r = self._at(self.diffs, index)
        if projected:
            m = self._at(self.harmless, index)
            r = _unit(r - (r @ m) * m)
        return r

    def layer_basis(self, projected: bool = False) -> torch.Tensor:
        """One direction per layer [n_layers, 1, d] (float32): for layer ``l``'s writes, the
        candidate read where they land, the residual stream after the layer (``l + 1``), or
        at the first layer with a candidate that is not zero when that is later; ``projected``
        as for :meth:`direction`."""
        return torch.stack(
            [
                self.basis(float(max(layer + 1, self.first_layer)), projected)
                for layer in range(self.n_layers)
            ]
        )

    def basis(self, index: float, projected: bool = False, k: int = 1) -> torch.Tensor:
        """Orthonormal rows [k, d] (float32): the direction, then the top ``k - 1`` directions
        of the per-prompt differences (each harmful prompt's activation minus the harmless
        mean, at the nearest layer) once the direction is removed from them."""
        r = self.direction(index, projected)
        if k == 1:
            return orthonormal(r.unsqueeze(0))
        layer = round(index)
        diffs = self.rows()[:, layer] - self.harmless[layer]
        diffs = diffs - (diffs @ r).unsqueeze(-1) * r
        if not torch.isfinite(diffs).all():
            raise RefdirError(f"the per-prompt differences at layer {layer} are not finite")
        if diffs.shape[0] < k - 1:
            raise RefdirError(
                f"a subspace of {k} directions needs at least {k - 1} harmful prompts"
            )
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        return orthonormal(torch.cat([r.unsqueeze(0), vh[: k - 1]]))

    def cone_basis(self, k: int) -> torch.Tensor:
        """The trained cone of ``k`` directions [k, d] (float32)."""
        if self.cone is None:
            raise RefdirError("this search trains no cone; add `cone` to `methods`")
        return self.cone(k)

    def rows(self) -> torch.Tensor:
        """The harmful prompts' activations [N, L+1, d] at the position (taken once)."""
        if self._rows is None:
            if self.cm is None or not self.harmful:
                raise RefdirError("a subspace needs the model and harmful prompts")
            self._rows = residual_rows(
                self.cm, self.harmful, self.position, self.batch_size, desc="subspace activations"
            )
        return self._rows
