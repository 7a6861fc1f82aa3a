"""The paper's prompt filter: a harmful prompt counts only if the model refuses it (refusal
metric > 0 at the last position), a harmless one only if the model answers it (< 0)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refdir.errors import RefdirError
from refdir.measures import refusal_metric
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits

__all__ = ["filter_prompts", "filtered_out", "refusal_filter"]


def filtered_out(name: str) -> RefdirError:
    """The error for a prompt set that the paper's refusal-metric filter emptied."""
    return RefdirError(
        f"the refusal-metric filter removed every prompt of {name}; check the refusal tokens "
        "(`refusal_tokens`), or keep every prompt with `filter_prompts=False` (a model that "
        "refuses nothing has no refusal direction to find)"
    )


def refusal_filter(
    logits: torch.Tensor, token_ids: Sequence[int], keep_positive: bool
) -> torch.Tensor:
    """The paper's prompt filter on last-position logits [N, vocab]: bool [N], true where a
    harmful prompt is refused (metric > 0) or, with ``keep_positive`` false, where a harmless
    one is answered (metric < 0)."""
    metric = refusal_metric(logits, token_ids)
    return metric > 0 if keep_positive else metric < 0


def filter_prompts(
    cm: ChatModel,
    prompts: Sequence[str],
    token_ids: Sequence[int],
    keep_positive: bool,
    batch_size: int = 32,
) -> list[str]:
    """Keep harmful prompts the model refuses (metric > 0) or harmless ones it answers (< 0)."""
    keep = refusal_filter(last_position_logits(cm, prompts, batch_size), token_ids, keep_positive)
    return [p for p, k in zip(prompts, keep.tolist(), strict=True) if k]
