"""The refusal tokens the search scores: the run's, and the first tokens of the refusals the
model gives once its refusal direction is partly removed.

The run's refusal tokens are the first tokens of the unedited model's refusals. An edit that
removes part of the direction can leave refusals of another form: the organism, whose own
refusals all start with ``I``, starts most of its remaining ones with ``As`` ("As an AI
assistant, I can't ...") under a partial ablation. A cheap score that sees only ``I`` takes
those for compliance, and the search (and the cone's training, on the same score) drifts
towards edits that trade one form of refusal for the other. So before the first trial, the
model completes the harmful training prompts under the paper's edit at each of the starting
strengths, and every first token that starts at least :data:`MIN_COUNT` of those refusals, and
no more answers than refusals, is scored too (a token as likely to start an answer, ``Sure``
before a late refusal, would count answers as refusals). The study keeps the tokens (a user
attribute), so every worker and every later command scores with the same ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna

from refdir.directions.refusal_tokens import first_tokens
from refdir.interventions.edit import Edit
from refdir.model.chat_model import ChatModel
from refdir.optimize.search import completed

__all__ = [
    "MAX_TOKENS",
    "MIN_COUNT",
    "TOKENS_ATTR",
    "SearchTokens",
    "refusal_forms",
    "study_tokens",
]

log = logging.getLogger(__name__)

TOKENS_ATTR = "refusal_tokens"
"""The study's user attribute that holds the token ids it scores with."""
MIN_COUNT = 2
"""Refusals a first token must start (over the partial edits) to be scored: one is noise."""
MAX_TOKENS = 8
"""At most this many tokens in all, the run's first."""


@dataclass(frozen=True)
class SearchTokens:
    ids: tuple[int, ...]
    added: tuple[str, ...]
    """The texts of the tokens added to the run's."""


def refusal_forms(
    cm: ChatModel,
    harmful: Sequence[str],
    run_tokens: Sequence[int],
    edits: Sequence[Edit],
    batch_size: int = 32,
    progress: bool = True,
    max_new_tokens: int = 16,
) -> SearchTokens:
    """The run's tokens, then the first tokens of the refusals (by markers) of ``harmful``
    completed greedily under each of ``edits``, most frequent first, that start at least
    :data:`MIN_COUNT` of them and no more answers than refusals (at most :data:`MAX_TOKENS` in
    all)."""
    rows = [cm.chat.token_ids(text) for text in harmful]
    firsts: Counter[int] = Counter()  # of refusals
    starts: Counter[int] = Counter()  # of every completion
    for edit in edits:
        with edit.apply(cm):
            refused, began = first_tokens(cm, rows, max_new_tokens, batch_size, progress)
        firsts.update(refused)
        starts.update(began)
    ids = list(dict.fromkeys(int(t) for t in run_tokens))
    for token, count in firsts.most_common():
        if len(ids) >= MAX_TOKENS or count < MIN_COUNT:
            break
        if int(token) not in ids and 2 * count >= starts[token]:
            ids.append(int(token))
    added = tuple(str(cm.tokenizer.decode([t])) for t in ids[len(set(run_tokens)) :])
    if added:
        log.info(
            "the partly edited model also starts refusals with %s; the search scores those too",
            ", ".join(repr(t) for t in added),
        )
    return SearchTokens(tuple(ids), added)


def study_tokens(
    study: optuna.Study, run_tokens: Sequence[int], find: Callable[[], SearchTokens] | None
) -> list[int]:
    """The token ids ``study`` scores with: those it holds; else those ``find`` gives, kept in
    it. The run's alone where there is nothing to find (``find`` None: the user fixed them) or
    the study holds trials scored before it kept any."""
    held = study.user_attrs.get(TOKENS_ATTR)
    if isinstance(held, list) and held:
        return [int(t) for t in held]
    ids = [int(t) for t in run_tokens]
    if find is not None and not completed(study):
        ids = list(find().ids)
    study.set_user_attr(TOKENS_ATTR, ids)
    return ids
