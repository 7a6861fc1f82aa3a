"""Greedy batched generation and last-position logits, through the model's chat format."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from refdir.errors import RefdirError
from refdir.model.chat import by_length
from refdir.model.chat_model import ChatModel
from refdir.model.prefix import SharedPrefix
from refdir.model.thinking import THINK_CLOSE, THINK_OPEN

log = logging.getLogger(__name__)

__all__ = [
    "answer_texts",
    "generate",
    "generate_ids",
    "last_position_logits",
    "stop_ids",
    "unsort",
]


def stop_ids(cm: ChatModel) -> set[int]:
    """Token ids that end an answer: the tokenizer's eos and the model's generation eos."""
    found: set[int] = set()
    for value in (
        cm.tokenizer.eos_token_id,
        getattr(getattr(cm.model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(int(v) for v in value)
    return found


def generate_ids(
    cm: ChatModel,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "generate",
    variants: Sequence[int] | None = None,
    on_batch: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Greedy answers (token ids, the stop token included when reached) to prompt token ``rows``.

    Rows go through in batches of similar length (less padding); the prefix that every row
    shares (system prompt, template header) runs once and its keys/values are reused by every
    batch. Any active intervention applies to every pass, the prefix included.

    ``variants`` lets rows run under different versions of the model in the same batches (one
    intervention per row, :class:`~refdir.interventions.rows.RowConditions`): row ``i`` runs variant
    ``variants[i]`` (0, 1, ...), the shared prefix runs once per variant, and before every
    forward pass ``on_batch`` receives the variant of each row in flight, in batch order.
    """
    stops = stop_ids(cm)
    limit = cm.chat.max_tokens
    if limit is not None and rows and max(len(r) for r in rows) + max_new_tokens > limit:
        log.warning(
            "a prompt and its %d new tokens pass the model's context of %d tokens; its answer "
            "may degrade at the end",
            max_new_tokens,
            limit,
        )
    chunks = by_length(rows, batch_size)
    kinds = torch.tensor(list(variants) if variants is not None else [0] * len(rows))
    if kinds.shape[0] != len(rows) or (len(rows) and int(kinds.min()) < 0):
        raise RefdirError("give one variant index (0, 1, ...) per row")
    copies = int(kinds.max()) + 1 if len(rows) else 1
    tell = on_batch or (lambda _: None)
    answers: list[list[int]] = [[] for _ in rows]
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="prompt")
    with torch.inference_mode():
        tell(torch.arange(copies))
        prefix = SharedPrefix.build(cm, rows, copies=copies)
        for chunk in chunks:
            part = [rows[i] for i in chunk]
            outs = prefix.greedy(cm, part, max_new_tokens, stops, kinds[chunk], tell)
            for i, answer in zip(chunk, outs, strict=True):
                answers[i] = answer
            bar.update(len(chunk))
    bar.close()
    return answers


def generate(
    cm: ChatModel,
    instructions: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
    suffix: str = "",
) -> list[str]:
    """Greedy completions, one per instruction (``suffix`` is appended to each instruction)."""
    rows = [cm.chat.token_ids(text, suffix) for text in instructions]
    answers = generate_ids(cm, rows, max_new_tokens, batch_size, progress)
    return answer_texts(cm, answers)


def answer_texts(cm: ChatModel, answers: Sequence[Sequence[int]]) -> list[str]:
    """The text of each answer from :func:`generate_ids`, without the stop token that ended it
    (also when the stop token is an ordinary one, which decoding would otherwise keep)."""
    stops = stop_ids(cm)
    cut = [list(a[:-1]) if a and a[-1] in stops else list(a) for a in answers]
    if not cm.chat.thinks:
        return list(cm.tokenizer.batch_decode(cut, skip_special_tokens=True))
    # a reasoning model's think tags may be special tokens: keep them, drop the other ones
    special = _special_ids(cm.tokenizer) - _tag_ids(cm.tokenizer)
    kept = [[t for t in a if t not in special] for a in cut]
    return list(cm.tokenizer.batch_decode(kept, skip_special_tokens=False))


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids that decoding with ``skip_special_tokens`` leaves out."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {int(i) for i, t in added.items() if getattr(t, "special", False)} | set(
        tokenizer.all_special_ids
    )


def _tag_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids of the think tags, where the vocabulary has them as tokens."""
    vocab = tokenizer.get_vocab()
    return {vocab[tag] for tag in (THINK_OPEN, THINK_CLOSE) if tag in vocab}


def unsort(parts: Sequence[torch.Tensor], chunks: Sequence[Sequence[int]]) -> torch.Tensor:
    """The rows of ``parts`` (one tensor per chunk of :func:`~refdir.model.chat.by_length`) back in
    their original order."""
    first = parts[0]
    out = first.new_empty((sum(len(p) for p in parts), *first.shape[1:]))
    for part, chunk in zip(parts, chunks, strict=True):  # no joined copy: logits can be large
        out[torch.tensor(list(chunk), dtype=torch.long, device=out.device)] = part
    return out


def last_position_logits(
    cm: ChatModel,
    instructions: Sequence[str],
    batch_size: int = 32,
    suffix: str = "",
    reuse_prefix: bool = True,
) -> torch.Tensor:
    """[N, vocab] float32 logits at the last prompt position (the first response token).

    Only the last position goes through the unembedding; prompts go through in batches of
    similar length. The template prefix that every
    prompt shares (system prompt, headers) is run once per call and its key/value cache is
    reused for every batch, with position ids that match the unpadded prompts; any active
    intervention applies to the prefix pass too.
    """
    rows = [cm.chat.token_ids(text, suffix) for text in instructions]
    chunks = by_length(rows, batch_size)
    with torch.inference_mode():
        prefix = SharedPrefix.build(cm, rows, reuse_prefix)
        parts = [prefix.logits(cm, [rows[i] for i in chunk]) for chunk in chunks]
    return unsort(parts, chunks)
