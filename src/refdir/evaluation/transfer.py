"""Directions of one model scored on the same prompts: does a direction picked from one sample
of prompts work on the held-out prompts of another? Each direction is ablated at every layer
and position (the paper's directional ablation); the harmful prompts are scored by the refusal
metric (the log-odds of the refusal tokens at the first response position, the measure that
selection's bypass score averages) and the harmless prompts by the KL score. All directions go
through the model together (:func:`refdir.directions.scoring.candidate_logits`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refdir.directions.scoring import candidate_logits
from refdir.measures import kl_divergence, refusal_metric
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits

__all__ = ["Transfer", "ablation_transfer"]


@dataclass(frozen=True)
class Transfer:
    """Scores on one set of prompts: without intervention, and with each direction ablated."""

    refusal_baseline: float
    """Mean refusal metric of the harmful prompts without intervention."""
    refusal: list[float]
    """Mean refusal metric of the harmful prompts with each direction ablated (lower: refuses
    less)."""
    kl: list[float]
    """Mean KL(baseline ‖ ablation) on the harmless prompts, per direction."""


def ablation_transfer(
    cm: ChatModel,
    vectors: torch.Tensor,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_tokens: Sequence[int],
    batch_size: int = 32,
) -> Transfer:
    """Each of ``vectors`` [K, d_model] ablated on ``harmful`` and ``harmless`` prompts."""
    base_harmful = last_position_logits(cm, harmful, batch_size)
    ablated = candidate_logits(cm, harmful, vectors, "ablate", batch_size=batch_size)
    refusal = refusal_metric(ablated, refusal_tokens).mean(dim=-1)
    base_harmless = last_position_logits(cm, harmless, batch_size)
    ablated = candidate_logits(cm, harmless, vectors, "ablate", batch_size=batch_size)
    kl = kl_divergence(base_harmless.to(ablated.device).expand_as(ablated), ablated).mean(dim=-1)
    return Transfer(
        refusal_baseline=round(float(refusal_metric(base_harmful, refusal_tokens).mean()), 5),
        refusal=[round(float(v), 5) for v in refusal],
        kl=[round(float(v), 5) for v in kl],
    )
