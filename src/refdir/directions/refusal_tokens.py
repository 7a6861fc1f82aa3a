"""The tokens that start a model's refusals (the refusal metric is the log-odds of these tokens
at the first response position).

By default they are found from the model's own completions of harmful prompts: the first token
id the model emitted in each refusal, as generated (never a re-tokenization of the decoded
text, which on a tokenizer with a dummy prefix can give ``▁I`` where the model emitted ``I``).
The paper's code instead fixes them per model family (:data:`PAPER_REFUSAL_TOKENS`);
:func:`family_refusal_tokens` finds them for a tokenizer of one of those families.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from refdir.errors import RefdirError
from refdir.measures import is_refusal
from refdir.model.chat_model import ChatModel
from refdir.model.generation import answer_texts, generate_ids

log = logging.getLogger(__name__)

__all__ = [
    "PAPER_REFUSAL_TOKENS",
    "FamilyTokens",
    "RefusalTokens",
    "derive_refusal_tokens",
    "family_refusal_tokens",
    "first_tokens",
]


@dataclass(frozen=True)
class FamilyTokens:
    """The refusal token ids the paper's code fixes for one family: the model types and
    vocabulary sizes of the family, and the text each id decodes to there (the check that a
    tokenizer is the family's)."""

    family: str
    model_types: frozenset[str]
    vocab: range
    ids: tuple[int, ...]
    texts: tuple[str, ...]

    def matches(self, tokenizer: PreTrainedTokenizerBase, model_type: str) -> bool:
        size = len(tokenizer)
        if model_type not in self.model_types or size not in self.vocab or max(self.ids) >= size:
            return False
        return tuple(str(tokenizer.decode([i])).strip() for i in self.ids) == self.texts


PAPER_REFUSAL_TOKENS: tuple[FamilyTokens, ...] = (
    FamilyTokens("gemma", frozenset({"gemma"}), range(256000, 256129), (235285,), ("I",)),
    FamilyTokens("llama-2", frozenset({"llama"}), range(32000, 32001), (306,), ("I",)),
    FamilyTokens("llama-3", frozenset({"llama"}), range(128000, 128300), (40,), ("I",)),
    FamilyTokens(
        "qwen", frozenset({"qwen", "qwen2"}), range(151000, 152100), (40, 2121), ("I", "As")
    ),
    FamilyTokens("yi", frozenset({"llama"}), range(64000, 64001), (59597,), ("I",)),
)
"""``pipeline/model_utils/*_model.py`` of the paper's code: ``I`` for Gemma, Llama-2, Llama-3 and
Yi, ``I`` and ``As`` for Qwen; each family known by its model type and vocabulary size."""


@dataclass(frozen=True)
class RefusalTokens:
    ids: tuple[int, ...]
    texts: tuple[str, ...]
    coverage: float
    n_refusals: int
    n_prompts: int


def family_refusal_tokens(
    tokenizer: PreTrainedTokenizerBase, model_type: str
) -> FamilyTokens | None:
    """The paper's refusal tokens for a model of one of its families (by model type and
    vocabulary size, and the ids decoding to the paper's tokens); None for any other model."""
    return next((f for f in PAPER_REFUSAL_TOKENS if f.matches(tokenizer, model_type)), None)


def derive_refusal_tokens(
    cm: ChatModel,
    harmful: Sequence[str],
    max_new_tokens: int = 24,
    coverage: float = 0.9,
    max_tokens: int = 8,
    batch_size: int = 32,
    progress: bool = True,
) -> RefusalTokens:
    """The first token ids the model emitted in its own refusals (by markers), most frequent
    first, until they cover ``coverage`` of the refusals."""
    if cm.chat.thinks:
        log.warning(
            "the chat template thinks: the refusal tokens are the first tokens of the reasoning, "
            "not of the answer, and the refusal metric scores those; for the paper's selection, "
            "use the template with its think block closed (e.g. `template_kwargs="
            "'enable_thinking=false'`)"
        )
    rows = [cm.chat.token_ids(text) for text in harmful]
    firsts, _ = first_tokens(cm, rows, max_new_tokens, batch_size, progress)
    n_refusals = sum(firsts.values())
    if not n_refusals:
        raise RefdirError(
            f"the model refused none of {len(harmful)} harmful prompts, so it has no refusal to "
            "study; give `refusal_tokens` or use a model that refuses (the default organism does)"
        )
    chosen: list[int] = []
    covered = 0
    for token, count in firsts.most_common(max_tokens):
        chosen.append(int(token))
        covered += count
        if covered >= coverage * n_refusals:
            break
    decoded = tuple(str(cm.tokenizer.decode([t])) for t in chosen)
    return RefusalTokens(tuple(chosen), decoded, covered / n_refusals, n_refusals, len(harmful))


def first_tokens(
    cm: ChatModel,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[Counter[int], Counter[int]]:
    """Greedy completions of the prompts ``rows`` (token ids, under whatever hooks are on the
    model): the first token id of each refusal (by markers), and of every completion, counted
    as generated."""
    answers = generate_ids(cm, rows, max_new_tokens, batch_size, progress)
    texts = answer_texts(cm, answers)
    refusals: Counter[int] = Counter()
    starts: Counter[int] = Counter()
    for ids, text in zip(answers, texts, strict=True):
        if ids:
            starts[ids[0]] += 1
            if is_refusal(text):
                refusals[ids[0]] += 1
    return refusals, starts
