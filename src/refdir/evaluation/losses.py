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
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from tqdm.auto import tqdm

from refdir.chat import by_length
from refdir.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluate import intervention
from refdir.generation import SharedPrefix, last_position_logits, unsort
from refdir.layer_inputs import LayerInputs
from refdir.model import ChatModel

__all__ = [
    "CORPORA",
    "Losses",
    "Scope",
    "ScoredRows",
    "ce_loss",
    "ce_loss_on_completions",
    "ce_losses",
    "check_baseline",
    "completion_rows",
    "intervention_scope",
    "kl_by_prompt",
    "kl_completions",
    "kl_divergence",
    "kl_last_position",
    "kl_summary",
    "load_corpus",
    "random_kl_summary",
    "resolve_scope",
    "text_rows",
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
        **_quantiles(values, {"median": 0.5, "p90": 0.9, "max": 1.0}),
        "refused_at_baseline": group(mask),
        "answered_at_baseline": group(~mask),
    }


def _quantiles(values: torch.Tensor, at: dict[str, float]) -> dict[str, float]:
    """``values`` (float64) at the named quantiles, rounded to 5 digits."""
    return {name: round(float(values.quantile(q)), 5) for name, q in at.items()}


def random_kl_summary(reference: torch.Tensor, chosen: float, seed: int) -> dict[str, Any]:
    """How the KL score ``chosen`` of a direction compares with that of random directions
    (``reference``, from :func:`refdir.select.random_direction_kl` with ``seed``): their
    spread, and the fraction of them whose ablation costs less than the chosen direction's."""
    if reference.dim() != 1 or reference.numel() == 0:
        raise RefdirError(f"expected a non-empty vector of KL values, got {tuple(reference.shape)}")
    values = reference.double()
    return {
        "n": int(values.numel()),
        "seed": seed,
        **_quantiles(values, {"median": 0.5, "p10": 0.1, "p90": 0.9, "min": 0.0, "max": 1.0}),
        "below_chosen": round(float((values < chosen).double().mean()), 4),
    }


def check_baseline(baseline: torch.Tensor | None, prompts: Sequence[str]) -> None:
    """Raise unless there are ``prompts`` and ``baseline``, when given, holds last-position
    logits [N, vocab] for the N of them."""
    if not prompts:
        raise RefdirError("no prompts to compute the KL divergence on")
    if baseline is not None and (baseline.dim() != 2 or baseline.shape[0] != len(prompts)):
        raise RefdirError(
            f"baseline logits have shape {tuple(baseline.shape)}; expected [{len(prompts)}, vocab]"
        )


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
    check_baseline(baseline, prompts)
    enter = resolve_scope(cm, scope, kind, direction, coeff)
    if baseline is None:
        baseline = last_position_logits(cm, prompts, batch_size)
    with enter():
        intervened = last_position_logits(cm, prompts, batch_size)
    return kl_divergence(baseline, intervened)


@dataclass(frozen=True)
class ScoredRows:
    """Token rows and, per row, where its scored tokens begin: row ``i`` is scored on
    ``ids[i][starts[i]:]`` (each predicted from the tokens before it; ``starts[i]`` >= 1)."""

    ids: list[list[int]]
    starts: list[int]


@dataclass(frozen=True)
class Losses:
    """Cross-entropy of :class:`ScoredRows` under one condition.

    ``ce``: mean nats per scored token (float64 sum); ``n_tokens``: tokens scored; ``first``:
    [N, vocab] float32 logits at the position before each row's first scored token, in the
    rows' order (for a prompt + completion row: the prompt's last-position logits, the
    distribution of the KL score)."""

    ce: float
    n_tokens: int
    first: torch.Tensor


def text_rows(cm: ChatModel, texts: Sequence[str], max_length: int | None = 256) -> ScoredRows:
    """Plain texts, no chat template, each cut to its first ``max_length`` tokens; every token
    after the first is scored."""
    if isinstance(texts, str) or not texts:
        raise RefdirError("give a non-empty list of texts for the CE loss")
    if max_length is not None and max_length < 2:
        raise RefdirError(f"max_length must be at least 2 tokens, got {max_length}")
    rows = [list(cm.tokenizer(t)["input_ids"]) for t in texts]
    rows = [r[:max_length] if max_length else r for r in rows]
    if all(len(r) < 2 for r in rows):
        raise RefdirError("no tokens to score: every text is shorter than two tokens")
    return ScoredRows(rows, [1] * len(rows))


def completion_rows(
    cm: ChatModel, prompts: Sequence[str], completions: Sequence[str]
) -> ScoredRows:
    """Chat-formatted prompts followed by their completions; the completion tokens are scored."""
    if isinstance(prompts, str) or isinstance(completions, str):
        raise RefdirError("give lists of prompts and completions, not one string")
    if not prompts:
        raise RefdirError("no prompts to compute the CE loss on")
    if len(prompts) != len(completions):
        raise RefdirError(f"got {len(prompts)} prompts but {len(completions)} completions")
    rows, starts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        head = cm.chat.token_ids(prompt)
        tail = list(cm.tokenizer(completion, add_special_tokens=False)["input_ids"])
        rows.append(head + tail)
        starts.append(len(head))
    return ScoredRows(rows, starts)


@dataclass(frozen=True)
class _Window:
    """One batch's logits over the last ``keep`` positions of its rows (left-padded, so every
    row ends at the window's end), with each row's targets and where its scoring begins."""

    logits: torch.Tensor  # [B, keep, vocab], as the model returns them
    targets: torch.Tensor  # [B, keep - 1]: the token each position predicts (0 where unscored)
    scored: torch.Tensor  # [B, keep - 1] bool
    first: torch.Tensor  # [B]: window index of the logits that predict the first scored token


def _window(cm: ChatModel, rows: ScoredRows, chunk: Sequence[int], prefix: SharedPrefix) -> _Window:
    """Run one batch; only the positions that predict a scored token (and the one before the
    first) go through the unembedding."""
    ids = [rows.ids[i] for i in chunk]
    counts = [len(rows.ids[i]) - rows.starts[i] for i in chunk]
    keep = max(counts) + 1
    logits = prefix.last_logits(cm, ids, keep)
    targets = torch.zeros(len(chunk), keep - 1, dtype=torch.long)
    scored = torch.zeros(len(chunk), keep - 1, dtype=torch.bool)
    for j, (row, n) in enumerate(zip(ids, counts, strict=True)):
        if n:
            targets[j, keep - 1 - n :] = torch.tensor(row[len(row) - n :])
            scored[j, keep - 1 - n :] = True
    first = torch.tensor([keep - 1 - n for n in counts])
    return _Window(logits, targets, scored, first)


def _nll(window: _Window) -> torch.Tensor:
    """Negative log-likelihood of every scored token, float64 [n] (the log-normaliser is taken in
    float32 over the vocabulary, max-shifted, then the difference in float64)."""
    logits = window.logits[:, :-1].float()
    targets = window.targets.to(logits.device)
    lse = logits.logsumexp(-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    scored = window.scored.to(logits.device)
    return (lse[scored].double() - picked[scored].double()).cpu()


def _prefix(cm: ChatModel, rows: ScoredRows) -> SharedPrefix:
    """The prefix the rows share, up to the position before the first scored token."""
    with torch.inference_mode():
        return SharedPrefix.build(cm, rows.ids, at_most=min(rows.starts) - 1)


def _losses(
    cm: ChatModel,
    rows: ScoredRows,
    batch_size: int,
    desc: str,
    progress: bool,
    record: int | None = None,
    replay: tuple[LayerInputs, int] | None = None,
) -> tuple[Losses, LayerInputs | None]:
    """CE of ``rows`` under whatever is active. ``record``: also record that layer's inputs (a
    baseline pass, for later passes that start there); ``replay``: start at that layer from
    the recording (the model must equal the recorded one below it)."""
    chunks = by_length(rows.ids, batch_size)
    prefix = _prefix(cm, rows)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    firsts: list[torch.Tensor] = []
    live: dict[str, list[int]] = {"rows": []}
    recorder = None
    with ExitStack() as stack, torch.inference_mode():
        if record is not None and record > 0:
            recorder = stack.enter_context(
                LayerInputs.recording(cm, rows.ids, prefix.length, [record])
            )
        if replay is not None:
            replay[0].check(rows.ids, prefix.length)
            stack.enter_context(replay[0].start_at(cm, replay[1], live))
        for chunk in tqdm(chunks, desc, disable=not progress):
            if recorder is not None:
                recorder.in_flight(chunk)
            live["rows"] = list(chunk)
            window = _window(cm, rows, chunk, prefix)
            nll = _nll(window)
            total += nll.sum()
            count += nll.numel()
            at = torch.arange(len(chunk), device=window.logits.device)
            firsts.append(window.logits[at, window.first.to(at.device)].float().cpu())
    if count == 0:
        raise RefdirError("no tokens to score: every completion is empty")
    first = unsort(firsts, chunks)
    return Losses(float(total / count), count, first), (recorder.result() if recorder else None)


def ce_loss(
    cm: ChatModel,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = 256,
    progress: bool = True,
) -> float:
    """Mean next-token cross-entropy (nats per token) of plain texts, no chat template; each
    text is cut to its first ``max_length`` tokens. Measures whatever intervention is active."""
    return _losses(cm, text_rows(cm, texts, max_length), batch_size, "ce loss", progress)[0].ce


def ce_loss_on_completions(
    cm: ChatModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean cross-entropy of the completion tokens given their chat-formatted prompts (the
    paper's on-distribution CE, on the model's own completions of harmless prompts)."""
    rows = completion_rows(cm, prompts, completions)
    return _losses(cm, rows, batch_size, "ce loss (completions)", progress)[0].ce


def ce_losses(
    cm: ChatModel,
    rows: ScoredRows,
    direction: Direction | None,
    conditions: Mapping[str, tuple[str, float]],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "ce loss",
) -> dict[str, Losses]:
    """The CE of the same rows under several conditions (name -> (kind, coeff): ``none``,
    ``ablate`` or ``actadd`` with ``direction``), each entered in turn.

    Activation addition changes nothing below the direction's layer, so when a ``none``
    condition is among them it runs first and records that layer's inputs, and the ``actadd``
    passes start there (the same result, less work)."""
    if not conditions:
        raise RefdirError("give at least one condition to compute the CE loss under")
    for kind, coeff in conditions.values():
        intervention_scope(cm, kind, direction, coeff)  # validate every one before any pass
    layer = direction.layer if direction is not None else 0
    starts_at = any(k == "actadd" for k, _ in conditions.values()) and layer > 0
    order = sorted(conditions, key=lambda name: conditions[name][0] != "none")
    recorded: LayerInputs | None = None
    out: dict[str, Losses] = {}
    for name in order:
        kind, coeff = conditions[name]
        replay = (recorded, layer) if kind == "actadd" and recorded is not None else None
        record = layer if kind == "none" and starts_at and recorded is None else None
        with intervention(cm, kind, direction, coeff):
            out[name], taken = _losses(
                cm, rows, batch_size, f"{desc} ({name})", progress, record, replay
            )
        recorded = taken or recorded
    return {name: out[name] for name in conditions}


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
    enter = resolve_scope(cm, scope, kind, direction, coeff)
    rows = completion_rows(cm, prompts, completions)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    base_prefix = _prefix(cm, rows)
    with enter():
        new_prefix = _prefix(cm, rows)
    chunks = by_length(rows.ids, batch_size)
    for chunk in tqdm(chunks, "kl", disable=not progress):
        with torch.inference_mode():
            base = _window(cm, rows, chunk, base_prefix)
            with enter():
                new = _window(cm, rows, chunk, new_prefix)
        scored = base.scored.to(base.logits.device)
        kl = kl_divergence(base.logits[:, :-1][scored], new.logits[:, :-1][scored])
        total += kl.sum().cpu()
        count += kl.numel()
    if count == 0:
        raise RefdirError("no completion tokens to compare; the completions are empty")
    return float(total / count)
