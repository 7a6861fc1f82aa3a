"""Direction selection as in the paper (Arditi et al., 2024, section 2.3 and appendix C): from
the candidates' scores (:mod:`refdir.directions.scoring`), those with KL > 0.1, induce < 0, or
layer >= 0.8 L are discarded and the lowest bypass wins. When nothing passes, a documented
fallback relaxes only the KL bound, step by step, and the rule used is recorded; a candidate
past the last bound is never picked.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from refdir.errors import RefdirError

__all__ = [
    "CandidateScores",
    "Selection",
    "SelectionConfig",
    "below_layer_filter",
    "passing",
    "pick",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectionConfig:
    """The paper's filters and the fallback; every number is an option."""

    kl_max: float = field(default=0.1, metadata={"help": "discard candidates with KL above this"})
    induce_min: float = field(
        default=0.0, metadata={"help": "discard candidates with induce below this"}
    )
    max_layer_fraction: float = field(
        default=0.8, metadata={"help": "discard layers >= this fraction of the depth"}
    )
    fallback_kl_bounds: tuple[float, ...] = field(
        default=(0.25, 0.5, 1.0),
        metadata={"help": "KL bounds tried in order when nothing passes; () disables the fallback"},
    )
    coeff: float = field(
        default=1.0, metadata={"help": "activation-addition coefficient for induce"}
    )


@dataclass(frozen=True)
class CandidateScores:
    """Scores over [positions, layers]; NaN marks a candidate not scored (a zero vector, a
    layer left out, or a bypass pruned by :func:`score_candidates`)."""

    positions: list[int]
    layers: list[int]
    bypass: torch.Tensor
    induce: torch.Tensor
    kl: torch.Tensor
    baseline_harmful: float
    baseline_harmless: float


@dataclass(frozen=True)
class Selection:
    position: int
    layer: int
    bypass: float
    induce: float
    kl: float
    rule: str
    fallback: bool
    passed: torch.Tensor
    n_candidates: int
    n_passed: int


def below_layer_filter(n_layers: int, config: SelectionConfig) -> torch.Tensor:
    """[n_layers] bool: the layers the paper's layer filter keeps (layer < fraction x L)."""
    return torch.arange(n_layers, dtype=torch.float64) < config.max_layer_fraction * n_layers


def _mask(scores: CandidateScores, config: SelectionConfig, kl_max: float) -> torch.Tensor:
    layer_ok = below_layer_filter(scores.bypass.shape[1], config)
    finite = (
        torch.isfinite(scores.bypass) & torch.isfinite(scores.induce) & torch.isfinite(scores.kl)
    )
    return finite & (scores.kl <= kl_max) & (scores.induce >= config.induce_min) & layer_ok


def passing(scores: CandidateScores, config: SelectionConfig) -> tuple[torch.Tensor, int]:
    """The candidates that pass the paper's filter ([positions, layers] bool) and how many
    candidates there are (scored, below the layer filter: the same with --score-all)."""
    below = below_layer_filter(scores.induce.shape[1], config)
    n_candidates = int((torch.isfinite(scores.induce) & below).sum())
    return _mask(scores, config, config.kl_max), n_candidates


def pick(scores: CandidateScores, config: SelectionConfig | None = None) -> Selection:
    """The paper's filter and pick, with the documented fallback when nothing passes."""
    config = config or SelectionConfig()
    frac = config.max_layer_fraction
    paper, n_candidates = passing(scores, config)
    attempts = [(config.kl_max, paper, False)]
    attempts += [
        (b, _mask(scores, config, b), True) for b in config.fallback_kl_bounds if b > config.kl_max
    ]
    for bound, mask, fallback in attempts:
        if not mask.any():
            continue
        masked = torch.where(mask, scores.bypass, torch.full_like(scores.bypass, math.inf))
        flat = int(torch.argmin(masked))
        p, layer = divmod(flat, masked.shape[1])
        rule = (
            f"paper: lowest bypass among candidates with kl <= {config.kl_max}, "
            f"induce >= {config.induce_min}, layer < {frac} L"
        )
        if fallback:
            rule = (
                f"fallback: no candidate passed the paper's filters (kl <= {config.kl_max}, "
                f"induce >= {config.induce_min}, layer < {frac} L); lowest bypass with the KL "
                f"bound relaxed to {bound}"
            )
            log.warning("direction selection: %s", rule)
        return Selection(
            scores.positions[p],
            layer,
            float(scores.bypass[p, layer]),
            float(scores.induce[p, layer]),
            float(scores.kl[p, layer]),
            rule,
            fallback,
            paper,
            n_candidates,
            int(paper.sum()),
        )
    bounds = ", ".join(str(b) for b, _, _ in attempts)
    raise RefdirError(
        f"no candidate passes the filters even with the KL bound relaxed to {bounds}; "
        "inspect selection.json and choose one by hand with `layer` and `position`"
    )
