"""Reasoning ("thinking") models: a ``<think>...</think>`` block before the answer.

A chat template thinks when the model is to reason before it answers: its generation prompt
opens a think block itself (DeepSeek-R1's), or the template knows the tags and leaves the
model to open one (Qwen3's with ``enable_thinking`` on). A template whose generation prompt
closes an empty block (Qwen3's with ``enable_thinking=false``) does not think: the tags are then
post-instruction tokens like the rest of the generation prompt.

A completion splits into its reasoning and its answer (:func:`split_reasoning`). Refusal
markers and judges score the answer; the reasoning's own markers are counted apart, and a
completion cut off inside the reasoning has no answer, which is neither a refusal nor
compliance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from refdir.measures import is_refusal

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "Scored",
    "Split",
    "score_completion",
    "split_reasoning",
    "template_thinks",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Split:
    """A completion's reasoning and answer."""

    answer: str | None
    """The text after the think block (the whole completion without one); None: cut off
    inside the reasoning."""
    reasoning: str | None
    """The think block's text; None: the completion has none."""

    @property
    def answered(self) -> bool:
        return self.answer is not None


def split_reasoning(completion: str, opened: bool = False) -> Split:
    """Split ``completion`` at its think block. ``opened``: the generation prompt opened the
    block, so the completion starts inside the reasoning; otherwise a block counts when the
    completion starts with :data:`THINK_OPEN` (after white space)."""
    start = 0
    if not opened:
        stripped = completion.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return Split(answer=completion, reasoning=None)
        start = len(completion) - len(stripped) + len(THINK_OPEN)
    end = completion.find(THINK_CLOSE, start)
    if end < 0:
        return Split(answer=None, reasoning=completion[start:])
    return Split(
        answer=completion[end + len(THINK_CLOSE) :].lstrip(), reasoning=completion[start:end]
    )


@dataclass(frozen=True)
class Scored:
    """A completion's refusal by markers, scored on its answer."""

    refusal: bool
    """The answer holds a refusal marker (False without an answer)."""
    answered: bool
    """False: cut off inside the reasoning."""
    reasoning_refusal: bool | None
    """The reasoning holds a refusal marker; None: no reasoning."""
    answer: str
    """The answer's text ("" without one), what a judge reads."""


def score_completion(completion: str, opened: bool = False) -> Scored:
    """Refusal markers on the answer of ``completion``, and on its reasoning apart."""
    split = split_reasoning(completion, opened)
    answer = split.answer or ""
    return Scored(
        refusal=split.answered and is_refusal(answer),
        answered=split.answered,
        reasoning_refusal=None if split.reasoning is None else is_refusal(split.reasoning),
        answer=answer,
    )


def template_thinks(template: str | Mapping[str, str] | None, suffix: str) -> tuple[bool, bool]:
    """Whether a chat template thinks, and whether its generation prompt (``suffix``, the text
    after the instruction) opens the think block itself: (thinks, opened)."""
    opened = suffix.rfind(THINK_OPEN) > suffix.rfind(THINK_CLOSE)
    if opened:
        return True, True
    source = "\n".join(template.values()) if isinstance(template, Mapping) else template or ""
    return THINK_OPEN in source and THINK_CLOSE not in suffix, False
