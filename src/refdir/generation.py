"""Greedy batched generation and last-position logits, through the model's chat format."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import Cache, GenerationConfig

from refdir.activations import batches
from refdir.chat import pad_left
from refdir.model import ChatModel

__all__ = ["SharedPrefix", "generate", "last_position_logits"]


def generate(
    cm: ChatModel,
    instructions: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
    suffix: str = "",
) -> list[str]:
    """Greedy completions, one per instruction (``suffix`` is appended to each instruction)."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=cm.chat.pad_id,
        eos_token_id=cm.tokenizer.eos_token_id,
    )
    completions: list[str] = []
    for chunk in tqdm(batches(instructions, batch_size), desc="generate", disable=not progress):
        batch = cm.chat.encode(chunk, suffix).to(cm.device)
        with torch.inference_mode():
            out = cm.model.generate(  # type: ignore[operator]
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                generation_config=config,
            )
        new = out[:, batch.input_ids.shape[1] :]
        completions.extend(cm.tokenizer.batch_decode(new, skip_special_tokens=True))
    return completions


def _shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to every row, leaving at least one token per row."""
    first = rows[0]
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def last_position_logits(
    cm: ChatModel,
    instructions: Sequence[str],
    batch_size: int = 32,
    suffix: str = "",
    reuse_prefix: bool = True,
) -> torch.Tensor:
    """[N, vocab] float32 logits at the last prompt position (the first response token).

    Only the last position goes through the unembedding. The template prefix that every
    prompt shares (system prompt, headers) is run once per call and its key/value cache is
    reused for every batch, with position ids that match the unpadded prompts; any active
    intervention applies to the prefix pass too.
    """
    rows = [cm.chat.token_ids(text, suffix) for text in instructions]
    with torch.inference_mode():
        prefix = SharedPrefix.build(cm, rows, reuse_prefix)
        out = [
            prefix.logits(cm, rows[start : start + batch_size])
            for start in range(0, len(rows), batch_size)
        ]
    return torch.cat(out)


_MIN_SHARED = 4


@dataclass
class SharedPrefix:
    """The token prefix every row shares, and its key/value cache (one cache row per
    ``copies``: callers that run several variants of the model, such as one candidate
    direction per row, keep one prefix row per variant)."""

    length: int
    cache: Cache | None

    @classmethod
    def build(
        cls, cm: ChatModel, rows: Sequence[Sequence[int]], enabled: bool = True, copies: int = 1
    ) -> SharedPrefix:
        shared = _shared_prefix_len(rows) if enabled and len(rows) > 1 else 0
        if shared < _MIN_SHARED:
            return cls(0, None)
        ids = torch.tensor([list(rows[0][:shared])] * copies, dtype=torch.long, device=cm.device)
        result = cm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = getattr(result, "past_key_values", None)
        return cls(shared, cache) if isinstance(cache, Cache) else cls(0, None)

    def logits(
        self, cm: ChatModel, rows: Sequence[Sequence[int]], cache_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last-position logits of ``rows``; ``cache_rows`` picks the prefix row of each."""
        batch = pad_left([r[self.length :] for r in rows], cm.chat.pad_id).to(cm.device)
        if self.cache is None:
            result = cm.model(
                **batch.inputs(),
                use_cache=False,
                logits_to_keep=1,
            )
            return result.logits[:, -1].float().cpu()
        n = batch.input_ids.shape[0]
        mask = torch.cat(
            [batch.attention_mask.new_ones(n, self.length), batch.attention_mask], dim=1
        )
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, self.length :]
        past = copy.deepcopy(self.cache)
        if cache_rows is None:
            past.batch_repeat_interleave(n)
        else:
            past.batch_select_indices(cache_rows.to(cm.device))
        result = cm.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
        return result.logits[:, -1].float().cpu()
