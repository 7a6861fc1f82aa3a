"""The search space of ``refdir optimize``: which edit methods are searched, their parameters,
the per-layer kernel of the weights, and the edit a set of parameters stands for.

Always searched: ``index``, the fractional layer of the direction (:mod:`.sources`). Each method
adds its own parameters; without it, its part of the edit is the paper's:

* ``weights``: per-layer weights for the attention and the MLP writes, each following a
  kernel (:func:`kernel`), and a weight for the embedding (the paper: 1 everywhere);
* ``projected``: whether the direction is made orthogonal to the harmless mean (no);
* ``norm``: whether the edit is norm-preserving (no);
* ``layers``: whether each layer's writes lose the direction read at that layer, in place of
  the one at ``index`` (which stays the embedding's, and the one activation addition adds);
  one direction, so with it ``subspace`` counts for nothing (no);
* ``subspace``: how many directions are removed, 1 to 3 (one);
* ``cone``: whether the directions are the cone trained by gradient (:mod:`.cone`) of that many
  directions, in place of the interpolated direction and its subspace (no).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from refdir.errors import RefdirError
from refdir.interventions.edit import MAX_WEIGHT, Edit
from refdir.optimize.config import METHOD_NAMES as METHODS
from refdir.optimize.sources import DirectionSources

__all__ = [
    "METHODS",
    "STRENGTHS",
    "check_methods",
    "edit_of",
    "kernel",
    "paper_params",
    "start_params",
    "suggest",
]
MAX_K = 3
PEAK = 1.5
"""The largest kernel peak searched (an edit's weights go up to :data:`MAX_WEIGHT`)."""
STRENGTHS = (0.25, 0.5, 0.75)
"""The paper's edit at these fractions of its strength starts a search with ``weights``, beside
the paper's edit itself: they lay out the front's low-KL end, where a search that is drawn to
few refusals would otherwise spend few trials."""


class Trial(Protocol):
    """The part of ``optuna.Trial`` the space uses."""

    def suggest_float(self, name: str, low: float, high: float) -> float: ...
    def suggest_int(self, name: str, low: int, high: int) -> int: ...
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods``, once each is known; an empty list searches the direction alone."""
    for method in methods:
        if method not in METHODS:
            raise RefdirError(f"unknown edit method {method!r}; use some of {', '.join(METHODS)}")
    return [m for m in METHODS if m in methods]


def kernel(
    n_layers: int, peak: float, center: float, width: float, edge: float
) -> tuple[float, ...]:
    """Per-layer weights: ``peak`` at ``center``, falling linearly to ``edge`` x ``peak`` at
    ``width`` layers away, and 0 beyond. A tent with a raised edge: a window of layers is
    edited (the refusal direction is read and written in the middle layers), strongest at its
    centre, with the strength at its edge free, so that a flat window (``edge`` = 1) and a
    narrow peak (``edge`` = 0) are both in reach."""
    if width <= 0:
        raise RefdirError(f"kernel width must be positive, got {width}")
    weights = []
    for layer in range(n_layers):
        distance = abs(layer - center)
        if distance > width:
            weights.append(0.0)
        else:
            w = peak * (1.0 - (1.0 - edge) * distance / width)
            weights.append(min(max(w, 0.0), MAX_WEIGHT))
    return tuple(weights)


def suggest(
    trial: Trial, methods: Sequence[str], n_layers: int, first_layer: int = 0
) -> dict[str, Any]:
    """The parameters of one trial (the direction's index from ``first_layer`` on)."""
    params: dict[str, Any] = {
        "index": trial.suggest_float("index", float(first_layer), float(n_layers))
    }
    if "weights" in methods:
        for part in ("attn", "mlp"):
            params[f"{part}_peak"] = trial.suggest_float(f"{part}_peak", 0.0, PEAK)
            params[f"{part}_center"] = trial.suggest_float(f"{part}_center", 0.0, n_layers - 1.0)
            params[f"{part}_width"] = trial.suggest_float(f"{part}_width", 1.0, float(n_layers))
            params[f"{part}_edge"] = trial.suggest_float(f"{part}_edge", 0.0, 1.0)
        params["embed"] = trial.suggest_float("embed", 0.0, 1.0)
    if "projected" in methods:
        params["projected"] = trial.suggest_categorical("projected", [False, True])
    if "norm" in methods:
        params["norm"] = trial.suggest_categorical("norm", [False, True])
    if "layers" in methods:
        params["layers"] = trial.suggest_categorical("layers", [False, True])
    if "subspace" in methods:
        params["k"] = trial.suggest_int("k", 1, MAX_K)
    if "cone" in methods:
        params["cone"] = trial.suggest_categorical("cone", [False, True])
    return params


def paper_params(layer: int, methods: Sequence[str], n_layers: int) -> dict[str, Any]:
    """The parameters of the paper's edit (its direction, ablated at full strength everywhere)
    in this space: a trial to start the search from."""
    params: dict[str, Any] = {"index": float(layer)}
    if "weights" in methods:
        for part in ("attn", "mlp"):
            params.update(
                {
                    f"{part}_peak": 1.0,
                    f"{part}_center": 0.0,
                    f"{part}_width": float(n_layers),
                    f"{part}_edge": 1.0,
                }
            )
        params["embed"] = 1.0
    if "projected" in methods:
        params["projected"] = False
    if "norm" in methods:
        params["norm"] = False
    if "layers" in methods:
        params["layers"] = False
    if "subspace" in methods:
        params["k"] = 1
    if "cone" in methods:
        params["cone"] = False
    return params


def start_params(layer: int, methods: Sequence[str], n_layers: int) -> list[dict[str, Any]]:
    """The trials a search starts from: the paper's edit and, with ``weights``, the same edit
    at each of :data:`STRENGTHS` (its weights everywhere scaled by it); with ``layers``, each
    of these again with each layer's own direction, and with ``cone`` with the cone of one in
    place of the direction (the cone at full strength is what its training optimised)."""
    paper = paper_params(layer, methods, n_layers)
    starts = [paper]
    if "weights" in methods:
        for strength in STRENGTHS:
            scaled = dict(paper)
            scaled.update({"attn_peak": strength, "mlp_peak": strength, "embed": strength})
            starts.append(scaled)
    extra = []
    if "layers" in methods:
        extra += [{**start, "layers": True} for start in starts]
    if "cone" in methods:
        extra += [{**start, "cone": True} for start in starts]
    return starts + extra


def edit_of(params: dict[str, Any], sources: DirectionSources) -> Edit:
    """The edit ``params`` stand for (missing parameters take the paper's values)."""
    n = sources.n_layers
    if "attn_peak" in params:
        attn = kernel(
            n,
            params["attn_peak"],
            params["attn_center"],
            params["attn_width"],
            params["attn_edge"],
        )
        mlp = kernel(
            n, params["mlp_peak"], params["mlp_center"], params["mlp_width"], params["mlp_edge"]
        )
        embed = float(params["embed"])
    else:
        attn = mlp = (1.0,) * n
        embed = 1.0
    k = int(params.get("k", 1))
    projected = bool(params.get("projected", False))
    per_layer = None
    if params.get("cone", False):
        basis = sources.cone_basis(k)
    elif params.get("layers", False):
        basis = sources.basis(float(params["index"]), projected, 1)
        per_layer = sources.layer_basis(projected)
    else:
        basis = sources.basis(float(params["index"]), projected, k)
    norm = bool(params.get("norm", False))
    return Edit(basis, attn, mlp, embed, norm, dict(params), per_layer)
