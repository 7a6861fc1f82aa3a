"""Cross-entropy of token rows (plain text, or prompts with their completions) and the KL of
an intervention over completion tokens, teacher-forced.

    with refdir.ablate(cm, d):
        ce_loss(cm, load_corpus())                  # CE under the intervention

CE runs the model as it is, so it measures whatever intervention is applied around it;
:func:`ce_losses` and :func:`kl_completions` apply the ones they are given. Only the positions
that predict a scored token go through the unembedding. Sums are float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refdir.errors import RefdirError
from refdir.interventions.intervention import Intervention
from refdir.measures import kl_divergence
from refdir.model.chat import by_length
from refdir.model.chat_model import ChatModel
from refdir.model.generation import unsort
from refdir.model.layer_inputs import LayerInputs
from refdir.model.prefix import SharedPrefix

__all__ = [
    "Losses",
    "ScoredRows",
    "ce_loss",
    "ce_loss_on_completions",
    "ce_losses",
    "completion_rows",
    "kl_completions",
    "text_rows",
]


@dataclass(frozen=True)
class ScoredRows:
    """Token rows and, per row, where its scored tokens begin: row ``i`` is scored on
    ``ids[i][starts[i]:]`` (each predicted from the tokens before it; ``starts[i]`` >= 1)."""

    ids: list[list[int]]
    starts: list[int]


@dataclass(frozen=True)
class Losses:
    """Cross-entropy of :class:`ScoredRows` under one condition.

    ``ce``: mean nats per scored token (float64 sum; NaN when no row has a scored token, e.g.
    every completion is empty); ``n_tokens``: tokens scored; ``first``:
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
    first = unsort(firsts, chunks)
    ce = float(total / count) if count else math.nan
    return Losses(ce, count, first), (recorder.result() if recorder else None)


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
    losses = _losses(cm, rows, batch_size, "ce loss (completions)", progress)[0]
    if losses.n_tokens == 0:
        raise RefdirError("no tokens to score: every completion is empty")
    return losses.ce


def ce_losses(
    cm: ChatModel,
    rows: ScoredRows,
    conditions: Mapping[str, Intervention],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "ce loss",
) -> dict[str, Losses]:
    """The CE of the same rows under several conditions (name -> intervention), each entered
    in turn.

    Activation addition changes nothing below its layer, so when a ``none`` condition is among
    them it runs first and records that layer's inputs, and the ``actadd`` passes (all at one
    layer) start there (the same result, less work)."""
    if not conditions:
        raise RefdirError("give at least one condition to compute the CE loss under")
    for condition in conditions.values():
        condition.hooks(cm)  # validate every one before any pass
    layers = {c.at_layer for c in conditions.values() if c.kind == "actadd"}
    layer = layers.pop() if len(layers) == 1 else 0
    starts_at = layer > 0
    order = sorted(conditions, key=lambda name: conditions[name].kind != "none")
    recorded: LayerInputs | None = None
    out: dict[str, Losses] = {}
    for name in order:
        condition = conditions[name]
        kind = condition.kind
        replay = (recorded, layer) if kind == "actadd" and recorded is not None else None
        record = layer if kind == "none" and starts_at and recorded is None else None
        with condition.apply(cm):
            out[name], taken = _losses(
                cm, rows, batch_size, f"{desc} ({name})", progress, record, replay
            )
        recorded = taken or recorded
    return {name: out[name] for name in conditions}


def kl_completions(
    cm: ChatModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    intervention: Intervention,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean KL(baseline || intervened) over every completion token, teacher-forced on the
    given completions; the intervention is entered once per batch."""
    intervention.hooks(cm)  # validate before any pass
    rows = completion_rows(cm, prompts, completions)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    base_prefix = _prefix(cm, rows)
    with intervention.apply(cm):
        new_prefix = _prefix(cm, rows)
    chunks = by_length(rows.ids, batch_size)
    for chunk in tqdm(chunks, "kl", disable=not progress):
        with torch.inference_mode():
            base = _window(cm, rows, chunk, base_prefix)
            with intervention.apply(cm):
                new = _window(cm, rows, chunk, new_prefix)
        scored = base.scored.to(base.logits.device)
        kl = kl_divergence(base.logits[:, :-1][scored], new.logits[:, :-1][scored])
        total += kl.sum().cpu()
        count += kl.numel()
    if count == 0:
        raise RefdirError("no completion tokens to compare; the completions are empty")
    return float(total / count)
