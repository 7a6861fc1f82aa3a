"""Direction selection as in the paper (Arditi et al., 2024, section 2.3 and appendix C): from
the candidates' scores (:mod:`refdir.directions.scoring`), those with KL > 0.1, induce < 0, or
a layer in the last 20% of the model are discarded and the lowest bypass wins. When nothing
passes, a documented fallback relaxes only the KL bound, step by step, and the rule used is
recorded; a candidate past the last bound is never picked.

The layer filter has two readings (:data:`LAYER_RULES`). The paper's text states it as
``layer < 0.8 L``, refdir's default, ``fraction``. The paper's code discards ``layer >= int(0.8 L)``: ``floor``, which the
paper protocol uses. They differ when 0.8 L is not whole, where ``fraction`` also keeps layer
``floor(0.8 L)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from refdir.artifacts.selection import LAYER_RULES, layer_bound, layer_rule_text
from refdir.errors import RefdirError

__all__ = [
    "LAYER_RULES",
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
    layer_rule: str = field(
        default="fraction",
        metadata={"help": "fraction: layer < f L; floor: layer < int(f L) (the paper's code)"},
    )
    epsilons: bool = field(
        default=False,
        metadata={"help": "score with the paper's code's epsilons (bounded log-odds and KL)"},
    )

    def __post_init__(self) -> None:
        if self.layer_rule not in LAYER_RULES:
            raise RefdirError(
                f"unknown layer rule {self.layer_rule!r}; use one of {', '.join(LAYER_RULES)}"
            )

    @property
    def layer_text(self) -> str:
        """The layer filter in words, e.g. ``layer < int(0.8 L)``."""
        return layer_rule_text(self.max_layer_fraction, self.layer_rule)


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
    """[n_layers] bool: the layers the layer filter keeps (``config.layer_rule``)."""
    bound = layer_bound(n_layers, config.max_layer_fraction, config.layer_rule)
    return torch.arange(n_layers, dtype=torch.float64) < bound


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
    frac = config.layer_text
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
            f"induce >= {config.induce_min}, {frac}"
        )
        if fallback:
            rule = (
                f"fallback: no candidate passed the paper's filters (kl <= {config.kl_max}, "
                f"induce >= {config.induce_min}, {frac}); lowest bypass with the KL "
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
