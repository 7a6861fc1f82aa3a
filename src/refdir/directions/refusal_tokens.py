"""The tokens that start a model's refusals, found from its own completions of harmful prompts
(the refusal metric is the log-odds of these tokens at the first response position)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from refdir.errors import RefdirError
from refdir.measures import is_refusal
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate

__all__ = ["RefusalTokens", "derive_refusal_tokens"]


@dataclass(frozen=True)
class RefusalTokens:
    ids: tuple[int, ...]
    texts: tuple[str, ...]
    coverage: float
    n_refusals: int
    n_prompts: int


def derive_refusal_tokens(
    cm: ChatModel,
    harmful: Sequence[str],
    max_new_tokens: int = 24,
    coverage: float = 0.9,
    max_tokens: int = 8,
    batch_size: int = 32,
    progress: bool = True,
) -> RefusalTokens:
    """The first tokens of the model's own refusals (by markers), most frequent first, until
    they cover ``coverage`` of the refusals."""
    completions = generate(cm, harmful, max_new_tokens, batch_size, progress)
    refusals = [c for c in completions if is_refusal(c)]
    if not refusals:
        raise RefdirError(
            f"the model refused none of {len(harmful)} harmful prompts, so it has no refusal to "
            "study; give `refusal_tokens` or use a model that refuses (the default organism does)"
        )
    firsts = Counter(
        ids[0]
        for c in refusals
        if (ids := cm.tokenizer(c.lstrip(), add_special_tokens=False)["input_ids"])
    )
    chosen: list[int] = []
    covered = 0
    for token, count in firsts.most_common(max_tokens):
        chosen.append(int(token))
        covered += count
        if covered >= coverage * len(refusals):
            break
    texts = tuple(str(cm.tokenizer.decode([t])) for t in chosen)
    return RefusalTokens(tuple(chosen), texts, covered / len(refusals), len(refusals), len(harmful))
