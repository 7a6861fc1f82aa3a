"""How much an intervention disturbs the model away from refusal: KL divergence of its
next-token distributions, and cross-entropy loss on plain text and on its own completions.

    base = last_position_logits(cm, harmless)              # once
    kl_last_position(cm, harmless, kind="ablate", direction=d, baseline=base)
    with ablate(cm, d):
        ce_loss(cm, load_corpus())                          # CE under the intervention

CE and KL run the model as it is, so they measure whatever ``ablate``/``add`` scope is active;
the KL functions enter the given intervention themselves. Sums are float64.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from tqdm.auto import tqdm

from refdir.chat import by_length, pad_left
from refdir.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluate import intervention
from refdir.generation import SharedPrefix, last_position_logits
from refdir.model import ChatModel

__all__ = [
    "CORPORA",
    "Scope",
    "ce_loss",
    "ce_loss_on_completions",
    "intervention_scope",
    "kl_by_prompt",
    "kl_completions",
    "kl_divergence",
    "kl_last_position",
    "kl_summary",
    "load_corpus",
    "resolve_scope",
]

Scope = Callable[[], AbstractContextManager[Any]]
"""A factory of intervention scopes: each call returns a fresh context manager."""

CORPORA: dict[str, str] = {"prose": "corpus/prose.json"}
"""Packaged plain-text corpora for CE loss, by name (see docs/evaluation.md)."""


def load_corpus(name: str = "prose", n: int | None = None) -> list[str]:
    """The texts of a packaged corpus (the first ``n`` when given)."""
    if name not in CORPORA:
        raise RefdirError(f"unknown corpus {name!r}; use one of {', '.join(CORPORA)}")
    text = (resources.files("refdir") / "data" / CORPORA[name]).read_text(encoding="utf-8")
    texts = [str(t) for t in json.loads(text)["texts"]]
    return texts if n is None else texts[:n]


def kl_summary(kl: torch.Tensor, refused: Sequence[bool]) -> dict[str, Any]:
    """How a per-prompt KL [N] is spread: median, 90th percentile and maximum, and the mean
    over the prompts the model refused at baseline and over those it answered (turning a
    refusal into an answer is what ablation is for; a large KL on answered prompts is damage)."""
    if kl.dim() != 1 or kl.numel() != len(refused) or kl.numel() == 0:
        raise RefdirError(f"got {kl.numel()} KL values for {len(refused)} prompts")
    values = kl.double()
    mask = torch.tensor([bool(r) for r in refused])

    def group(keep: torch.Tensor) -> dict[str, Any]:
        n = int(keep.sum())
        return {"n": n, "mean": round(float(values[keep].mean()), 5) if n else None}

    return {
        "median": round(float(values.quantile(0.5)), 5),
        "p90": round(float(values.quantile(0.9)), 5),
        "max": round(float(values.max()), 5),
        "refused_at_baseline": group(mask),
        "answered_at_baseline": group(~mask),
    }


def intervention_scope(
    cm: ChatModel, kind: str = "none", direction: Direction | None = None, coeff: float = 1.0
) -> Scope:
    """A scope factory for ``none``, ``ablate`` or ``actadd`` (``coeff`` x direction)."""
    with intervention(cm, kind, direction, coeff):  # validate now, not halfway through a run
        pass
    return lambda: intervention(cm, kind, direction, coeff)


def resolve_scope(
    cm: ChatModel,
    scope: Scope | None,
    kind: str,
    direction: Direction | None,
    coeff: float,
) -> Scope:
    """``scope`` itself, or the scope factory of ``kind`` + ``direction``; not both."""
    if scope is not None and (kind != "none" or direction is not None):
        raise RefdirError("give either a scope or kind+direction, not both")
    return scope if scope is not None else intervention_scope(cm, kind, direction, coeff)


def kl_divergence(baseline: torch.Tensor, intervened: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(baseline || intervened) in float64 from two logit tensors [..., vocab]."""
    if baseline.shape != intervened.shape:
        raise RefdirError(
            f"logit shapes differ: {tuple(baseline.shape)} vs {tuple(intervened.shape)}"
        )
    lp = baseline.double().log_softmax(-1)
    lq = intervened.double().log_softmax(-1)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(-1)


def kl_last_position(
    cm: ChatModel,
    prompts: Sequence[str],
    scope: Scope | None = None,
    *,
    kind: str = "none",
    direction: Direction | None = None,
    coeff: float = 1.0,
    baseline: torch.Tensor | None = None,
    batch_size: int = 32,
) -> float:
    """Mean KL(baseline || intervened) of the next-token distribution at the last prompt
    position (the paper's KL score). ``baseline``: precomputed ``last_position_logits``."""
    return float(
        kl_by_prompt(
            cm,
            prompts,
            scope,
            kind=kind,
            direction=direction,
            coeff=coeff,
            baseline=baseline,
            batch_size=batch_size,
        ).mean()
    )


def kl_by_prompt(
    cm: ChatModel,
    prompts: Sequence[str],
    scope: Scope | None = None,
    *,
    kind: str = "none",
    direction: Direction | None = None,
    coeff: float = 1.0,
    baseline: torch.Tensor | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """The KL of :func:`kl_last_position` for each prompt: float64 [N], in the prompts' order."""
    if not prompts:
        raise RefdirError("no prompts to compute the KL divergence on")
    enter = resolve_scope(cm, scope, kind, direction, coeff)
    if baseline is None:
        baseline = last_position_logits(cm, prompts, batch_size)
    if baseline.dim() != 2 or baseline.shape[0] != len(prompts):
        raise RefdirError(
            f"baseline logits have shape {tuple(baseline.shape)}; expected [{len(prompts)}, vocab]"
        )
    with enter():
        intervened = last_position_logits(cm, prompts, batch_size)
    return kl_divergence(baseline, intervened)


@dataclass(frozen=True)
class _Scored:
    """One batch of token rows and, per row, where its scored tokens begin."""

    rows: list[list[int]]
    starts: list[int]


def _text_rows(cm: ChatModel, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
    rows = [list(cm.tokenizer(t)["input_ids"]) for t in texts]
    return [r[:max_length] if max_length else r for r in rows]


def _completion_rows(
    cm: ChatModel, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    """Chat-formatted prompt ids + completion ids, and where each completion begins."""
    if isinstance(prompts, str) or isinstance(completions, str):
        raise RefdirError("give lists of prompts and completions, not one string")
    if len(prompts) != len(completions):
        raise RefdirError(f"got {len(prompts)} prompts but {len(completions)} completions")
    rows, starts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        head = cm.chat.token_ids(prompt)
        tail = list(cm.tokenizer(completion, add_special_tokens=False)["input_ids"])
        rows.append(head + tail)
        starts.append(len(head))
    return rows, starts


def _chunks(rows: list[list[int]], starts: list[int], size: int) -> Iterator[_Scored]:
    """Batches of rows of similar length (the order of the rows does not change a mean)."""
    for chunk in by_length(rows, size):
        yield _Scored([rows[i] for i in chunk], [starts[i] for i in chunk])


def _scored_logits(
    cm: ChatModel, batch: _Scored, prefix: SharedPrefix
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [n, vocab] (float32, CPU) that predict each scored token, and those tokens [n].
    ``prefix`` (shorter than every row's first scored token) runs once for every batch."""
    tails = [row[prefix.length :] for row in batch.rows]
    padded = pad_left(tails, cm.chat.pad_id)
    width = padded.input_ids.shape[1]
    scored = torch.zeros_like(padded.input_ids, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(tails, batch.starts, strict=True)):
        scored[i, width - len(row) + max(start - prefix.length, 1) :] = True
    with torch.inference_mode():
        logits = prefix.all_logits(cm, batch.rows)
    picked = logits[:, :-1][scored[:, 1:].to(logits.device)]
    return picked.float().cpu(), padded.input_ids[:, 1:][scored[:, 1:]]


def _prefix(cm: ChatModel, rows: list[list[int]], starts: list[int]) -> SharedPrefix:
    """The prefix the rows share, up to the position before the first scored token."""
    with torch.inference_mode():
        return SharedPrefix.build(cm, rows, at_most=min(starts) - 1)


def _mean_ce(
    cm: ChatModel,
    rows: list[list[int]],
    starts: list[int],
    batch_size: int,
    desc: str,
    progress: bool,
) -> float:
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    n_batches = -(-len(rows) // batch_size) if batch_size > 0 else 0
    prefix = _prefix(cm, rows, starts)
    for batch in tqdm(_chunks(rows, starts, batch_size), desc, n_batches, disable=not progress):
        logits, targets = _scored_logits(cm, batch, prefix)
        logp = logits.double().log_softmax(-1).gather(-1, targets.unsqueeze(-1))
        total -= logp.sum()
        count += targets.numel()
    if count == 0:
        raise RefdirError("no tokens to score: every text is shorter than two tokens")
    return float(total / count)


def ce_loss(
    cm: ChatModel,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = 256,
    progress: bool = True,
) -> float:
    """Mean next-token cross-entropy (nats per token) of plain texts, no chat template; each
    text is cut to its first ``max_length`` tokens."""
    if isinstance(texts, str) or not texts:
        raise RefdirError("give a non-empty list of texts for the CE loss")
    if max_length is not None and max_length < 2:
        raise RefdirError(f"max_length must be at least 2 tokens, got {max_length}")
    rows = _text_rows(cm, texts, max_length)
    return _mean_ce(cm, rows, [1] * len(rows), batch_size, "ce loss", progress)


def ce_loss_on_completions(
    cm: ChatModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean cross-entropy of the completion tokens given their chat-formatted prompts (the
    paper's on-distribution CE, on the model's own completions of harmless prompts)."""
    if not prompts:
        raise RefdirError("no prompts to compute the CE loss on")
    rows, starts = _completion_rows(cm, prompts, completions)
    return _mean_ce(cm, rows, starts, batch_size, "ce loss (completions)", progress)


def kl_completions(
    cm: ChatModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    scope: Scope | None = None,
    *,
    kind: str = "none",
    direction: Direction | None = None,
    coeff: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean KL(baseline || intervened) over every completion token, teacher-forced on the
    given completions; the scope is entered once per batch."""
    if not prompts:
        raise RefdirError("no prompts to compute the KL divergence on")
    enter = resolve_scope(cm, scope, kind, direction, coeff)
    rows, starts = _completion_rows(cm, prompts, completions)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    n_batches = -(-len(rows) // batch_size) if batch_size > 0 else 0
    base_prefix = _prefix(cm, rows, starts)
    with enter():
        new_prefix = _prefix(cm, rows, starts)
    for batch in tqdm(_chunks(rows, starts, batch_size), "kl", n_batches, disable=not progress):
        base, _ = _scored_logits(cm, batch, base_prefix)
        with enter():
            new, _ = _scored_logits(cm, batch, new_prefix)
        total += kl_divergence(base, new).sum()
        count += base.shape[0]
    if count == 0:
        raise RefdirError("no completion tokens to compare; the completions are empty")
    return float(total / count)
