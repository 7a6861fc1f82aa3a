"""The search's two objectives, cheap enough for hundreds of trials: one forward pass over the
validation prompts under the edit's hooks, no generation.

* refusal: the mean probability of the refusal tokens at the first response position on the
  harmful validation prompts (smooth, so the sampler sees small gains); the share of prompts
  whose refusal log-odds is above 0 is kept beside it;
* KL: the mean KL(original || edited) of the next token at the last prompt position on the
  harmless validation prompts (the paper's KL score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.measures import kl_divergence, refusal_metric
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits

__all__ = ["Scores", "TrialScorer"]


@dataclass(frozen=True)
class Scores:
    refusal_score: float
    refusal_first_token: float
    kl: float


class TrialScorer:
    """Scores edits on fixed validation prompts against the unedited model's logits (taken
    once)."""

    def __init__(
        self,
        cm: ChatModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        refusal_tokens: Sequence[int],
        batch_size: int = 64,
    ) -> None:
        if not harmful or not harmless:
            raise RefdirError("the search needs harmful and harmless validation prompts")
        self.cm = cm
        self.harmful = list(harmful)
        self.harmless = list(harmless)
        self.tokens = list(refusal_tokens)
        self.batch_size = batch_size
        self.baseline = last_position_logits(cm, self.harmless, batch_size)

    def score(self, edit: Edit | None) -> Scores:
        """The objectives under ``edit`` (None: the model as it is)."""
        prompts = self.harmful + self.harmless  # one call: the batches stay full
        if edit is None:
            logits = last_position_logits(self.cm, prompts, self.batch_size)
        else:
            with edit.apply(self.cm):
                logits = last_position_logits(self.cm, prompts, self.batch_size)
        harmful, harmless = logits[: len(self.harmful)], logits[len(self.harmful) :]
        metric = refusal_metric(harmful, self.tokens)
        kl = kl_divergence(self.baseline.to(harmless.device), harmless)
        if not (torch.isfinite(metric).all() and torch.isfinite(kl).all()):
            raise RefdirError("the edited model's logits are not finite")
        return Scores(
            refusal_score=float(torch.sigmoid(metric).mean()),
            refusal_first_token=float((metric > 0).double().mean()),
            kl=float(kl.mean()),
        )
