"""Refusal directions compared across two models of the same width (a base model and its
chat model, two checkpoints, a model and its abliterated or hardened version):

* the cosine of the two chosen directions, and of their difference-of-means candidates at
  every layer when both sides come with them (a run folder or an extract folder);
* each model's held-out harmful and harmless activations, at its direction's position and
  every layer, projected onto its own unit direction and onto the other's;
* each model's refusal rate (markers, greedy) with the other's direction ablated at every layer
  and position, and added at the other's layer (coefficient 1, its raw vector), beside its own
  direction and no intervention.

A direction applied to the other model is taken as a vector of its width: the model signature
that guards a direction against another model is set aside on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from refdir.artifacts.comparison import CrossRates, DirectionSide, SideProjections
from refdir.directions.candidates import Candidates
from refdir.directions.direction import DIRECTION_FILE, Direction
from refdir.directions.extraction import post_instruction_rows
from refdir.errors import RefdirError
from refdir.evaluation.refusal import Job, evaluate_jobs
from refdir.interventions.intervention import NONE, Intervention
from refdir.model.chat_model import ChatModel

__all__ = [
    "CANDIDATES_FILE",
    "DirectionSource",
    "cross_rates",
    "layer_cosines",
    "projections",
    "read_source",
    "vector_cosine",
]

CANDIDATES_FILE = "candidates.safetensors"


@dataclass(frozen=True)
class DirectionSource:
    """One side as given: its direction (for any model of its width) and, when they lie
    beside it, its candidates."""

    path: Path
    direction: Direction
    candidates: Candidates | None


def read_source(path: str | Path) -> DirectionSource:
    """A run folder, an extract folder, or a direction file (``.safetensors`` / ``.json``)."""
    path = Path(path)
    if not path.exists():
        raise RefdirError(f"{path} does not exist; give a run folder or a direction file")
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not (path / DIRECTION_FILE).exists():
        raise RefdirError(
            f"{path} holds no {DIRECTION_FILE}; give a finished run, an extract folder or a "
            "direction file"
        )
    direction = Direction.load(path, any_model=True)
    cands_path = folder / CANDIDATES_FILE
    cands = Candidates.load(cands_path) if cands_path.exists() else None
    return DirectionSource(path, direction, cands)


def vector_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float(a64 @ b64 / (a64.norm() * b64.norm()).clamp_min(1e-300))


def layer_cosines(a: Candidates, b: Candidates, position: int) -> list[float | None]:
    """The cosine of the two sides' difference of means at ``position``, at every layer (None
    where either is zero: at a layer's input that only the token's embedding reaches, the
    last post-instruction token is the same for every prompt)."""
    if a.harmful_mean.shape != b.harmful_mean.shape:
        raise RefdirError(
            f"the candidates have shapes {tuple(a.harmful_mean.shape)} and "
            f"{tuple(b.harmful_mean.shape)}; the two models need the same layers, width and "
            "post-instruction positions for a per-layer comparison"
        )
    if position not in a.positions:
        raise RefdirError(f"position {position} is not one of {a.positions}")
    da, db = a.diffs[position], b.diffs[position]  # [L+1, d]
    return [
        vector_cosine(x, y) if x.norm() > 0 and y.norm() > 0 else None
        for x, y in zip(da, db, strict=True)
    ]


def projections(
    cm: ChatModel,
    own: Direction,
    other: Direction,
    harmful: Sequence[str],
    harmless: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
) -> SideProjections:
    """Mean projections of ``cm``'s activations at ``own``'s position, every layer, onto the
    unit ``own`` and ``other`` directions."""
    units = {"own": own.unit().double(), "other": other.unit().double()}
    means: dict[str, list[float]] = {}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        rows = post_instruction_rows(
            cm, prompts, None, [own.position], "", batch_size, progress, f"{name} activations"
        )[:, 0]  # [N, L+1, d]
        for which, unit in units.items():
            means[f"{name}_{which}"] = (rows @ unit).mean(0).tolist()
    return SideProjections(**means)


def cross_rates(
    cm: ChatModel,
    own: Direction,
    other: Direction,
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
) -> CrossRates:
    """Refusal rates of ``cm`` with no intervention, its own direction and the other's, ablated
    on the harmful prompts and added on the harmless ones (one decoding for the conditions of
    each direction)."""
    if own.d_model != other.d_model:
        raise RefdirError(
            f"the directions have widths {own.d_model} and {other.d_model}; compare models of "
            "the same width"
        )
    h, n = list(harmful), list(harmless)
    own_jobs = [
        Job("harmful_baseline", h, NONE),
        Job("harmful_ablate_own", h, Intervention.ablation(own)),
        Job("harmless_baseline", n, NONE),
        Job("harmless_add_own", n, Intervention.addition(own)),
    ]
    other_jobs = [
        Job("harmful_ablate_other", h, Intervention.ablation(other)),
        Job("harmless_add_other", n, Intervention.addition(other)),
    ]
    results = [
        *evaluate_jobs(cm, own_jobs, max_new_tokens, batch_size, progress),
        *evaluate_jobs(cm, other_jobs, max_new_tokens, batch_size, progress),
    ]
    return CrossRates(**{r.prompts: r.refusal_rate for r in results})


def side(
    label: str,
    source: DirectionSource,
    model: str,
    with_results: tuple[SideProjections, CrossRates] | None,
) -> DirectionSide:
    """What the comparison's file holds of one side."""
    d = source.direction
    return DirectionSide(
        label=label,
        source=str(source.path),
        model=model,
        layer=d.layer,
        position=d.position,
        norm=d.norm,
        projections=with_results[0] if with_results else None,
        rates=with_results[1] if with_results else None,
    )
