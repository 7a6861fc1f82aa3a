"""A universal adversarial suffix by greedy coordinate gradient (GCG, Zou et al., 2023).

The suffix is a fixed number of tokens appended to every instruction, before the
post-instruction template tokens. Each step:

1. one forward and backward pass through one-hot suffix tokens (``one_hot @ W_E``, passed as
   ``inputs_embeds``) gives the gradient of the objective with respect to every token choice;
2. the ``topk`` most negative gradient entries per position (among allowed tokens: printable
   ASCII, no special tokens) are the candidate swaps; ``batch_size`` candidates, one swap each,
   are sampled with a seeded ``torch.Generator``;
3. candidates that would not re-tokenize to the same ids after every instruction are dropped
   (GCG's filter: the suffix is used as text afterwards); the rest are scored with forward passes
   in inference mode, computing only the logits that the objective needs;
4. the best candidate replaces the current suffix if it lowers the objective (``accept="improve"``,
   the default: a short CPU search never moves backwards), or always (``accept="best"``, as in
   GCG). The best suffix seen is returned either way.

The prompt before the suffix (template prefix + instruction) is the same for every candidate,
so its key/value cache is computed once and reused: each forward pass only runs the suffix and
the post-instruction tokens (hybrid models, whose recurrent or convolution state cannot be
repeated per candidate, run the whole prompt in every pass instead). Two objectives, both minimised and averaged over the instructions:

* ``refusal``: the refusal log-odds at the first response token,
  ``logsumexp(logits[R]) - logsumexp(logits[not R])`` for the refusal-start tokens ``R``;
* ``target``: the cross-entropy of a target response prefix such as ``"Sure, here is"``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from refdir.errors import RefdirError
from refdir.hf import cache_kwargs, returned_cache
from refdir.model.chat_model import ChatModel

__all__ = [
    "REFUSAL_WORDS",
    "SuffixConfig",
    "SuffixResult",
    "SuffixSearch",
    "allowed_token_mask",
    "random_suffix_ids",
    "refusal_token_ids",
    "retokenizes",
    "search_suffix",
    "suffix_text",
]

log = logging.getLogger(__name__)

REFUSAL_WORDS: tuple[str, ...] = ("I", "As")
"""Words that start refusals ("I'm sorry", "I cannot", "As an AI"); their first tokens are ``R``."""

Objective = Literal["refusal", "target"]
Accept = Literal["improve", "best"]


def refusal_token_ids(
    tokenizer: PreTrainedTokenizerBase, words: Sequence[str] = REFUSAL_WORDS
) -> list[int]:
    """The first token id of each word as it would start a response (no leading space)."""
    ids: list[int] = []
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise RefdirError(f"refusal word {word!r} tokenizes to nothing")
        if int(tokens[0]) not in ids:
            ids.append(int(tokens[0]))
    if not ids:
        raise RefdirError("give at least one refusal word")
    return ids


def allowed_token_mask(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """[vocab] bool: tokens that decode to non-empty printable ASCII and are not special."""
    special = set(tokenizer.all_special_ids)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    for i, text in enumerate(texts):
        mask[i] = bool(text) and text.isascii() and text.isprintable() and i not in special
    return mask


@dataclass(frozen=True)
class SuffixConfig:
    """Search options; the defaults fit a 135M model on 2 CPU cores in a few minutes."""

    n_tokens: int = 16
    n_steps: int = 20
    topk: int = 64
    batch_size: int = 32
    """Candidates scored per step (each one token swap away from the current suffix)."""
    eval_batch: int = 128
    """Rows (candidate x instruction) per forward pass when scoring candidates."""
    objective: Objective = "refusal"
    refusal_words: tuple[str, ...] = REFUSAL_WORDS
    target: str = "Sure, here is"
    init: str = " !"
    """Repeated and cut to ``n_tokens`` tokens to make the starting suffix."""
    accept: Accept = "improve"
    seed: int = 0
    max_seconds: float | None = None
    """Stop after the step that crosses this wall-clock budget (None: run every step)."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "n_steps", "topk", "batch_size", "eval_batch"):
            if getattr(self, name) <= 0 and not (name == "n_steps" and self.n_steps == 0):
                raise RefdirError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.objective not in ("refusal", "target"):
            raise RefdirError(f"unknown objective {self.objective!r}; use refusal or target")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise RefdirError("the time budget must be positive")
        if self.accept not in ("improve", "best"):
            raise RefdirError(f"unknown accept rule {self.accept!r}; use improve or best")


@dataclass
class SuffixResult:
    """The best suffix found, its objective history, and how it was found."""

    suffix: str
    token_ids: list[int]
    objective: str
    loss: float
    initial_loss: float
    history: list[float]
    """Current objective after each step (index 0: the initial suffix)."""
    best_history: list[float]
    seconds: float
    """Wall-clock time of the search."""
    cpu_seconds: float
    """Process CPU time of the search (wall time x threads when the machine is not shared)."""
    n_steps: int
    """Steps actually run (fewer than asked when the time budget ran out)."""
    instructions: list[str]
    model: str
    refusal_token_ids: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-step history (that goes to ``history.json``)."""
        data = asdict(self)
        data.pop("history")
        data.pop("best_history")
        return data


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the block (no weight gradients are built)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _embed_scale(cm: ChatModel) -> float:
    """The factor the embedding module applies to its rows (sqrt(d) for Gemma, else 1)."""
    embed = cm.layout.embed
    probe = torch.tensor([1], device=cm.device)
    with torch.no_grad():
        out, row = embed(probe)[0].float(), embed.weight[1].detach().float()
    denom = float(row @ row)
    return float(out @ row) / denom if denom > 0 else 1.0


class SuffixSearch:
    """The state of one search: the instructions' cached prefixes, the objective, the filters.

    ``loss(ids)`` scores suffixes, ``gradient(ids)`` gives d loss / d one-hot, ``step`` runs one
    GCG step. ``search_suffix`` wraps these into a full search.
    """

    def __init__(self, cm: ChatModel, instructions: Sequence[str], config: SuffixConfig) -> None:
        if not instructions:
            raise RefdirError("no instructions to search a suffix for")
        self.cm, self.config = cm, config
        self.instructions = list(instructions)
        tok = cm.tokenizer
        self.vocab = int(cm.layout.embed.weight.shape[0])
        self.allowed = allowed_token_mask(tok, self.vocab)
        if not self.allowed.any():
            raise RefdirError("the tokenizer has no printable ASCII tokens to build a suffix from")
        self.heads = _heads(cm, self.instructions)
        tail = list(cm.chat.suffix_ids)
        self.target_ids: list[int] = []
        if config.objective == "target":
            self.target_ids = list(tok(config.target, add_special_tokens=False)["input_ids"])
            if not self.target_ids:
                raise RefdirError("the target text tokenizes to nothing")
        self.tail = torch.tensor(tail + self.target_ids, dtype=torch.long)
        self.keep = len(self.target_ids) + 1
        self.refusal_ids = refusal_token_ids(tok, config.refusal_words)
        self._not_refusal = torch.ones(self.vocab, dtype=torch.bool)
        self._not_refusal[self.refusal_ids] = False
        self.scale = _embed_scale(cm)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._build_cache()

    # ------------------------------------------------------------------ prefix cache

    def _build_cache(self) -> None:
        width = max(len(h) for h in self.heads)
        n = len(self.heads)
        ids = torch.full((n, width), self.cm.chat.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, head in enumerate(self.heads):
            ids[i, width - len(head) :] = torch.tensor(head)
            mask[i, width - len(head) :] = 1
        self.head_mask = mask.to(self.cm.device)
        self.head_len = mask.sum(1).to(self.cm.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0).to(self.cm.device)
        with torch.no_grad():  # not inference_mode: the cache also feeds the gradient pass
            out = self.cm.model(
                input_ids=ids.to(self.cm.device),
                attention_mask=self.head_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
        cache = returned_cache(out)
        layers = getattr(cache, "layers", None)
        # recurrent or convolution state (hybrid models) cannot be repeated per candidate: such
        # models run the whole prompt in every pass (None), from the prefix's embeddings
        repeatable = isinstance(layers, list) and all(
            hasattr(layer, "batch_repeat_interleave") for layer in layers
        )
        self.cache = cache if repeatable else None
        with torch.no_grad():
            self.head_embeds = self.cm.layout.embed(ids.to(self.cm.device))

    def _forward(
        self,
        embeds: torch.Tensor,
        repeats: int,
        cache: Any = None,
        offset: int = 0,
        keep: int | None = None,
    ) -> Any:
        """Run new-token embeddings laid out instruction-major (row ``i * repeats + c``) after a
        cache of prefix + ``offset`` suffix tokens (default: the prefix cache). Returns the model
        output (logits for the last ``keep`` positions, the extended cache)."""
        head_mask = self.head_mask.repeat_interleave(repeats, 0)
        if self.cache is None:  # the whole prompt, prefix first
            heads = self.head_embeds.repeat_interleave(repeats, 0).to(embeds.dtype)
            mask = torch.cat(
                [head_mask, head_mask.new_ones(head_mask.shape[0], embeds.shape[1])], 1
            )
            return self.cm.model(
                inputs_embeds=torch.cat([heads, embeds], 1),
                attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                use_cache=False,
                logits_to_keep=self.keep if keep is None else keep,
            )
        cache = copy.deepcopy(self.cache if cache is None else cache)
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        new = embeds.shape[1]
        mask = torch.cat([head_mask, head_mask.new_ones(head_mask.shape[0], offset + new)], 1)
        start = self.head_len.repeat_interleave(repeats, 0)[:, None] + offset
        positions = start + torch.arange(new, device=embeds.device)[None]
        return self.cm.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(self.cm.model, cache),
            logits_to_keep=self.keep if keep is None else keep,
        )

    def _suffix_cache(self, ids: torch.Tensor) -> Any:
        """The cache of prefix + the suffix ``ids`` (to score candidates that share a start)."""
        with torch.inference_mode():
            embeds = self.cm.layout.embed(ids.to(self.cm.device))[None]
            embeds = embeds.expand(len(self.heads), -1, -1)
            return returned_cache(self._forward(embeds, 1, keep=1))

    def _cropped(self, cache: Any, shared: int) -> Any:
        """A copy of a prefix + suffix cache cut back to prefix + ``shared`` suffix tokens, or
        None when this cache type cannot be cut."""
        if not getattr(cache, "is_croppable", True):
            return None
        cut = copy.deepcopy(cache)
        try:
            cut.crop(-(self.config.n_tokens - shared))
        except (RuntimeError, ValueError):
            return None
        return cut

    # ------------------------------------------------------------------ objective

    def _row_losses(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows] objective per (candidate, instruction) row from [rows, keep, vocab] logits."""
        if self.config.objective == "refusal":
            last = logits[:, -1]
            refuse = last[:, self.refusal_ids].logsumexp(-1)
            rest = last.masked_fill(~self._not_refusal.to(last.device), float("-inf")).logsumexp(-1)
            return refuse - rest
        targets = torch.tensor(self.target_ids, device=logits.device)
        pred = logits[:, :-1]
        return (
            F.cross_entropy(
                pred.reshape(-1, pred.shape[-1]),
                targets.repeat(pred.shape[0]),
                reduction="none",
            )
            .view(pred.shape[0], -1)
            .mean(-1)
        )

    def _embeds(self, suffix_embeds: torch.Tensor) -> torch.Tensor:
        """[C, S, d] suffix embeddings -> [n * C, S + tail, d] instruction-major inputs."""
        n, c = len(self.heads), suffix_embeds.shape[0]
        tail = self.cm.layout.embed(self.tail.to(self.cm.device))
        tail = tail.to(suffix_embeds.dtype)[None].expand(c, -1, -1)
        per_candidate = torch.cat([suffix_embeds, tail], 1)
        return (
            per_candidate.unsqueeze(0)
            .expand(n, -1, -1, -1)
            .reshape(n * c, *per_candidate.shape[1:])
        )

    def loss(self, candidates: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """[C] mean objective over the instructions for [C, n_tokens] suffix ids (inference mode).

        With ``base`` (the current suffix), candidates that keep its first ``k`` tokens start from
        a cache of those tokens. To keep forward passes large (small matrix products are slow on
        a CPU) the candidates are split into buckets of at least ``eval_batch`` rows by the first
        position where they differ; a bucket shares the tokens before its first position.
        """
        n_tokens = self.config.n_tokens
        n_buckets = min(n_tokens, len(candidates) * len(self.heads) // self.config.eval_batch)
        if self.cache is None or base is None or candidates.shape[1] != n_tokens or n_buckets < 2:
            return self._loss_from(candidates, None, 0)
        differs = candidates != base[None]
        first = torch.where(differs.any(1), differs.float().argmax(1), n_tokens - 1)
        width = -(-n_tokens // n_buckets)
        offsets = (first // width) * width
        full = self._suffix_cache(base)
        losses = torch.empty(len(candidates))
        for shared in offsets.unique().tolist():
            rows = (offsets == shared).nonzero().flatten()
            cache = self._cropped(full, shared) if shared > 0 else None
            offset = shared if cache is not None else 0
            losses[rows] = self._loss_from(candidates[rows, offset:], cache, offset)
        return losses

    def _loss_from(self, tails: torch.Tensor, cache: Any, offset: int) -> torch.Tensor:
        """[C] objective for suffix tails [C, n_tokens - offset] after a cache of ``offset``
        suffix tokens (None: the prefix cache, offset 0)."""
        n = len(self.heads)
        per_chunk = max(1, self.config.eval_batch // n)
        losses: list[torch.Tensor] = []
        with torch.inference_mode():
            for chunk in tails.split(per_chunk):
                embeds = self._embeds(self.cm.layout.embed(chunk.to(self.cm.device)))
                out = self._forward(embeds, len(chunk), cache, offset)
                rows = self._row_losses(out.logits.float())
                losses.append(rows.view(n, len(chunk)).mean(0).cpu())
        return torch.cat(losses)

    def gradient(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """d loss / d one-hot [n_tokens, vocab] at the suffix ``ids``, and the loss there."""
        weight = self.cm.layout.embed.weight
        one_hot = torch.zeros(len(ids), self.vocab, dtype=weight.dtype, device=weight.device)
        one_hot.scatter_(1, ids.to(weight.device)[:, None], 1.0)
        one_hot.requires_grad_(True)
        with _frozen(self.cm.model):
            suffix_embeds = (one_hot @ weight) * self.scale
            logits = self._forward(self._embeds(suffix_embeds[None]), 1).logits.float()
            loss = self._row_losses(logits).mean()
            (grad,) = torch.autograd.grad(loss, one_hot)
        return grad.float().cpu(), float(loss.detach())

    # ------------------------------------------------------------------ candidates

    def text(self, ids: torch.Tensor | Sequence[int]) -> str:
        return suffix_text(self.cm, ids)

    def retokenizes(self, candidates: torch.Tensor) -> torch.Tensor:
        """[C] bool: the decoded suffix, appended to every instruction, gives back its ids."""
        return retokenizes(self.cm, self.instructions, self.heads, candidates)

    def initial_ids(self) -> torch.Tensor:
        """The starting suffix: ``config.init`` repeated and cut to ``n_tokens`` tokens."""
        init = self.config.init
        if not init:
            raise RefdirError("the initial suffix text is empty")
        ids = list(
            self.cm.tokenizer(init * self.config.n_tokens, add_special_tokens=False)["input_ids"]
        )
        if len(ids) < self.config.n_tokens:
            raise RefdirError(f"the initial text {init!r} gives too few tokens")
        start = torch.tensor(ids[: self.config.n_tokens], dtype=torch.long)
        if not bool(self.allowed[start].all()):
            raise RefdirError(
                f"the initial text {init!r} has special or non-ASCII tokens; pass another `init`"
            )
        if not bool(self.retokenizes(start[None])[0]):
            raise RefdirError(
                f"the initial suffix from {init!r} does not re-tokenize to itself; pass another `init`"
            )
        return start

    def sample(self, ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """[<= batch_size, n_tokens] distinct one-swap candidates from the top-k of -grad."""
        cfg = self.config
        scores = (-grad).masked_fill(~self.allowed, float("-inf"))
        k = min(cfg.topk, int(self.allowed.sum()))
        top = scores.topk(k, dim=1).indices  # [S, k]
        n_draw = 2 * cfg.batch_size  # oversample: some are dropped by the filters
        pos = torch.randint(0, len(ids), (n_draw,), generator=self.generator)
        choice = torch.randint(0, k, (n_draw,), generator=self.generator)
        cands = ids.repeat(n_draw, 1)
        cands[torch.arange(n_draw), pos] = top[pos, choice]
        cands = cands[(cands != ids).any(1)]
        cands = _unique_rows(cands)
        cands = cands[self.retokenizes(cands)] if len(cands) else cands
        return cands[: cfg.batch_size]

    def step(self, ids: torch.Tensor, current: float) -> tuple[torch.Tensor, float]:
        """One GCG step from ``ids`` (whose loss is ``current``): the next suffix and its loss."""
        grad, _ = self.gradient(ids)
        cands = self.sample(ids, grad)
        if len(cands) == 0:
            return ids, current
        losses = self.loss(cands, base=ids)
        best = int(losses.argmin())
        value = float(losses[best])
        if self.config.accept == "best" or value < current:
            return cands[best].clone(), value
        return ids, current


def _heads(cm: ChatModel, instructions: Sequence[str]) -> list[list[int]]:
    """Token ids of template prefix + instruction, tokenized as ``ChatFormat.token_ids`` does."""
    tok = cm.tokenizer
    return [
        list(tok(cm.chat.prefix + t, add_special_tokens=False)["input_ids"]) for t in instructions
    ]


def suffix_text(cm: ChatModel, ids: torch.Tensor | Sequence[int]) -> str:
    """The text of suffix token ids (decoded verbatim, no clean-up of spaces)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return str(cm.tokenizer.decode(values, clean_up_tokenization_spaces=False))


def retokenizes(
    cm: ChatModel,
    instructions: Sequence[str],
    heads: Sequence[Sequence[int]],
    candidates: torch.Tensor,
) -> torch.Tensor:
    """[C] bool: each candidate's text, appended to every instruction, tokenizes back to
    ``head + candidate`` (GCG's filter; the suffix is used as text afterwards)."""
    texts = [suffix_text(cm, row) for row in candidates]
    strings = [cm.chat.prefix + t + s for s in texts for t in instructions]
    encoded = cm.tokenizer(strings, add_special_tokens=False)["input_ids"]
    n = len(instructions)
    ok = torch.zeros(len(candidates), dtype=torch.bool)
    for c, row in enumerate(candidates.tolist()):
        ok[c] = all(list(encoded[c * n + i]) == list(heads[i]) + row for i in range(n))
    return ok


def _unique_rows(rows: torch.Tensor) -> torch.Tensor:
    """Drop repeated rows, keeping the first occurrence and the order."""
    seen: set[tuple[int, ...]] = set()
    keep: list[int] = []
    for i, row in enumerate(rows.tolist()):
        key = tuple(row)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return rows[keep]


def random_suffix_ids(
    cm: ChatModel, instructions: Sequence[str], n_tokens: int, seed: int = 0, tries: int = 200
) -> list[int]:
    """A seeded random suffix of ``n_tokens`` allowed tokens that re-tokenizes to itself."""
    heads = _heads(cm, instructions)
    allowed = allowed_token_mask(cm.tokenizer, int(cm.layout.embed.weight.shape[0]))
    pool = allowed.nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        ids = pool[torch.randint(0, len(pool), (n_tokens,), generator=gen)]
        if bool(retokenizes(cm, instructions, heads, ids[None])[0]):
            return [int(i) for i in ids]
    raise RefdirError(
        f"no random suffix of {n_tokens} tokens re-tokenizes cleanly in {tries} tries"
    )


def search_suffix(
    cm: ChatModel,
    instructions: Sequence[str],
    config: SuffixConfig | None = None,
    progress: bool = True,
) -> SuffixResult:
    """Search a universal suffix for ``instructions``; returns the best one seen."""
    config = config or SuffixConfig()
    started, cpu_started = time.perf_counter(), time.process_time()
    search = SuffixSearch(cm, instructions, config)
    ids = search.initial_ids()
    current = float(search.loss(ids[None])[0])
    best_ids, best = ids.clone(), current
    history, best_history = [current], [best]
    bar = tqdm(range(config.n_steps), desc="suffix search", disable=not progress)
    for _ in bar:
        ids, current = search.step(ids, current)
        if current < best:
            best_ids, best = ids.clone(), current
        history.append(current)
        best_history.append(best)
        bar.set_postfix(loss=f"{current:.3f}", best=f"{best:.3f}")
        if config.max_seconds is not None and time.perf_counter() - started > config.max_seconds:
            log.info("suffix search: time budget reached after %d steps", len(history) - 1)
            break
    bar.close()
    return SuffixResult(
        suffix=search.text(best_ids),
        token_ids=[int(i) for i in best_ids],
        objective=config.objective,
        loss=best,
        initial_loss=history[0],
        history=history,
        best_history=best_history,
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
        n_steps=len(history) - 1,
        instructions=list(instructions),
        model=cm.name,
        refusal_token_ids=search.refusal_ids,
        config=json.loads(json.dumps(asdict(config))),  # JSON types: tuples become lists
    )
