"""Chat formatting with the model's own template, and the post-instruction token positions.

A marker instruction is rendered through the template; the text before it is the prefix, the
text after it (end of the user's turn, start of the assistant's) is the post-instruction
suffix. A prompt's ids are the tokenizer's own tokenization of the whole rendered text
(``prefix + instruction + suffix``), as the model sees it; the post-instruction ids are the
suffix's tokens as they come out inside a rendered prompt, not tokenized alone (a tokenizer
with a dummy prefix, as Llama-2's and Mistral's SentencePiece ones, adds a ``▁`` to a text that
starts alone). Rows are padded on the left, so the post-instruction tokens are the last
``n_post`` positions of every row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from refdir.errors import RefdirError
from refdir.model.thinking import template_thinks

__all__ = ["ChatFormat", "PromptBatch", "by_length", "pad_left"]

_MARKER = "\x00REFDIR_INSTRUCTION\x00"
_PLAIN = "Hello"
"""An ordinary instruction, in which the suffix's in-context tokens are read."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device))

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions of the unpadded prompts (padding gets 0), as generation computes them;
        needed by models with absolute position embeddings."""
        return (self.attention_mask.cumsum(1) - 1).clamp(min=0)

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a forward pass over this left-padded batch."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


@dataclass(frozen=True)
class ChatFormat:
    """How instructions become token ids for one tokenizer and template."""

    tokenizer: PreTrainedTokenizerBase
    prefix: str
    suffix: str
    suffix_ids: tuple[int, ...]
    system: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    """The model's context: a longer prompt is refused (None: no limit known)."""
    thinks: bool = False
    """The model reasons in a think block before it answers (:mod:`refdir.model.thinking`)."""
    opens_reasoning: bool = False
    """The generation prompt opens the think block: completions start inside it."""

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        system: str | None = None,
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
        max_tokens: int | None = None,
    ) -> ChatFormat:
        """Split the template around a marker instruction; fail clearly without a template.
        ``max_tokens``: the model's context, past which a prompt is refused."""
        kwargs = dict(template_kwargs or {})
        if chat_template is not None:
            kwargs["chat_template"] = chat_template
        elif not getattr(tokenizer, "chat_template", None):
            raise RefdirError(
                "the tokenizer has no chat template; give one (a Jinja template) as `chat_template`"
            )
        messages = [{"role": "user", "content": _MARKER}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as exc:  # jinja errors surface as many types
            raise RefdirError(
                f"the chat template failed to render: {exc}; check the template"
            ) from None
        if not isinstance(text, str) or text.count(_MARKER) != 1:
            raise RefdirError("the chat template does not place the instruction exactly once")
        prefix, suffix = text.split(_MARKER)
        if not suffix:
            raise RefdirError(
                "the chat template adds nothing after the instruction, so there are no "
                "post-instruction tokens; use a template with an assistant turn"
            )
        suffix_ids = _suffix_ids(tokenizer, prefix, suffix)
        template = kwargs.pop("chat_template", None) or getattr(tokenizer, "chat_template", None)
        thinks, opens = template_thinks(template, suffix)
        return cls(tokenizer, prefix, suffix, suffix_ids, system, kwargs, max_tokens, thinks, opens)

    @property
    def n_post(self) -> int:
        """Number of post-instruction positions (the template tokens after the instruction)."""
        return len(self.suffix_ids)

    def format(self, instruction: str) -> str:
        return self.prefix + instruction + self.suffix

    def token_ids(self, instruction: str, extra: str = "") -> list[int]:
        """Token ids of one prompt, the tokenizer's own tokenization of the rendered text;
        ``extra`` is appended to the instruction (a suffix attack)."""
        text = self.format(instruction + extra)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if tuple(ids[-self.n_post :]) != self.suffix_ids:
            # the instruction's last characters merged with the template's: keep the rendered
            # text's tokens, and say that the post-instruction positions shift for this prompt
            log.warning(
                "the end of an instruction merges with the chat template's tokens (%r...); its "
                "post-instruction positions differ from the other prompts'",
                instruction[-20:],
            )
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            start = " ".join(instruction.split())[:40]
            raise RefdirError(
                f"a prompt of {len(ids)} tokens with its chat template is longer than the "
                f"model's context of {self.max_tokens} tokens ({start!r}...); shorten it or leave "
                "it out"
            )
        return ids

    def encode(self, instructions: Sequence[str], extra: str = "") -> PromptBatch:
        """Left-padded batch; the last ``n_post`` positions are the post-instruction tokens."""
        rows = [self.token_ids(text, extra) for text in instructions]
        return pad_left(rows, self.pad_id)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise RefdirError(
                "the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token"
            )
        return int(pad if not isinstance(pad, list) else pad[0])


def _suffix_ids(tokenizer: PreTrainedTokenizerBase, prefix: str, suffix: str) -> tuple[int, ...]:
    """The suffix's tokens inside a rendered prompt: the tokenization of ``prefix + plain +
    suffix`` past that of ``prefix + plain``; the suffix tokenized alone where the two do not
    line up."""
    head = list(tokenizer(prefix + _PLAIN, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(prefix + _PLAIN + suffix, add_special_tokens=False)["input_ids"])
    if whole[: len(head)] == head and len(whole) > len(head):
        return tuple(whole[len(head) :])
    return tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"])


def by_length(rows: Sequence[Sized], size: int) -> list[list[int]]:
    """Indices of ``rows`` in batches of at most ``size``, shortest rows first (ties keep their
    order): the rows of one batch have similar lengths, so left padding wastes little compute."""
    if size <= 0:
        raise RefdirError(f"`batch_size` must be positive, got {size}")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> PromptBatch:
    """Pad token rows on the left into a batch with its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return PromptBatch(ids, mask)
