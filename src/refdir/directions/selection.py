"""Direction selection as in the paper (Arditi et al., 2024, section 2.3 and appendix C).

For every candidate (post-instruction position x layer) three scores, each a mean over the
validation prompts at the last position:

* bypass: the refusal log-odds on harmful_val with the candidate ablated everywhere;
* induce: the refusal log-odds on harmless_val with the candidate added at its layer;
* KL: KL(baseline || ablated) of the next-token distribution on harmless_val.

Candidates with KL > 0.1, induce < 0, or layer >= 0.8 L are discarded; the lowest bypass
wins. When nothing passes, a documented fallback relaxes only the KL bound, step by step,
and the rule used is recorded; a candidate past the last bound is never picked.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from refdir.chat import by_length
from refdir.direction import Candidates
from refdir.errors import RefdirError, filtered_out
from refdir.generation import SharedPrefix, generate, last_position_logits, unsort
from refdir.hooks import DeviceCopies, Hook, hooked, map_input, map_sites, rows_view
from refdir.layer_inputs import LayerInputs
from refdir.metrics import check_baseline, kl_divergence
from refdir.model import ChatModel
from refdir.scoring.markers import is_refusal
from refdir.stopwatch import Stopwatch, maybe

__all__ = [
    "CandidateScores",
    "RefusalTokens",
    "Selection",
    "SelectionConfig",
    "ValidationSets",
    "candidate_logits",
    "derive_refusal_tokens",
    "filter_prompts",
    "passing",
    "pick",
    "random_direction_kl",
    "refusal_filter",
    "refusal_metric",
    "score_candidates",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectionConfig:
    """The paper's filters and the fallback; every number is an option."""

    kl_max: float = field(default=0.1, metadata={"help": "discard candidates with KL above this"})
    induce_min: float = field(
        default=0.0, metadata={"help": "discard candidates with induce below this"}
    )
    max_layer_fraction: float = field(
        default=0.8, metadata={"help": "discard layers >= this fraction of the depth"}
    )
    fallback_kl_bounds: tuple[float, ...] = field(
        default=(0.25, 0.5, 1.0),
        metadata={"help": "KL bounds tried in order when nothing passes; () disables the fallback"},
    )
    coeff: float = field(
        default=1.0, metadata={"help": "activation-addition coefficient for induce"}
    )


@dataclass(frozen=True)
class RefusalTokens:
    ids: tuple[int, ...]
    texts: tuple[str, ...]
    coverage: float
    n_refusals: int
    n_prompts: int


def refusal_metric(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """log(p / (1 - p)) with p the probability mass of the refusal tokens; float64 [N]."""
    if not token_ids:
        raise RefdirError("no refusal tokens given")
    x = logits.double()
    mask = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    mask[list(token_ids)] = True
    refusal = torch.logsumexp(x[..., mask], dim=-1)
    other = torch.logsumexp(x[..., ~mask], dim=-1)
    return refusal - other


def derive_refusal_tokens(
    cm: ChatModel,
    harmful: Sequence[str],
    max_new_tokens: int = 24,
    coverage: float = 0.9,
    max_tokens: int = 8,
    batch_size: int = 32,
    progress: bool = True,
) -> RefusalTokens:
    """The first tokens of the model's own refusals (by markers), most frequent first, until
    they cover ``coverage`` of the refusals."""
    completions = generate(cm, harmful, max_new_tokens, batch_size, progress)
    refusals = [c for c in completions if is_refusal(c)]
    if not refusals:
        raise RefdirError(
            f"the model refused none of {len(harmful)} harmful prompts, so it has no refusal to "
            "study; pass --refusal-tokens or use a model that refuses (the default organism does)"
        )
    firsts = Counter(
        ids[0]
        for c in refusals
        if (ids := cm.tokenizer(c.lstrip(), add_special_tokens=False)["input_ids"])
    )
    chosen: list[int] = []
    covered = 0
    for token, count in firsts.most_common(max_tokens):
        chosen.append(int(token))
        covered += count
        if covered >= coverage * len(refusals):
            break
    texts = tuple(str(cm.tokenizer.decode([t])) for t in chosen)
    return RefusalTokens(tuple(chosen), texts, covered / len(refusals), len(refusals), len(harmful))


def refusal_filter(
    logits: torch.Tensor, token_ids: Sequence[int], keep_positive: bool
) -> torch.Tensor:
    """The paper's prompt filter on last-position logits [N, vocab]: bool [N], true where a
    harmful prompt is refused (metric > 0) or, with ``keep_positive`` false, where a harmless
    one is answered (metric < 0)."""
    metric = refusal_metric(logits, token_ids)
    return metric > 0 if keep_positive else metric < 0


def filter_prompts(
    cm: ChatModel,
    prompts: Sequence[str],
    token_ids: Sequence[int],
    keep_positive: bool,
    batch_size: int = 32,
) -> list[str]:
    """Keep harmful prompts the model refuses (metric > 0) or harmless ones it answers (< 0)."""
    keep = refusal_filter(last_position_logits(cm, prompts, batch_size), token_ids, keep_positive)
    return [p for p, k in zip(prompts, keep.tolist(), strict=True) if k]


@dataclass(frozen=True)
class CandidateScores:
    """Scores over [positions, layers]; NaN marks a candidate not scored (a zero vector, a
    layer left out, or a bypass pruned by :func:`score_candidates`)."""

    positions: list[int]
    layers: list[int]
    bypass: torch.Tensor
    induce: torch.Tensor
    kl: torch.Tensor
    baseline_harmful: float
    baseline_harmless: float


def candidate_logits(
    cm: ChatModel,
    prompts: Sequence[str],
    vectors: torch.Tensor,
    kind: str,
    layer: int = 0,
    coeff: float = 1.0,
    batch_size: int = 32,
    start: LayerInputs | None = None,
) -> torch.Tensor:
    """Last-position logits [K, N, vocab] of N prompts under K candidate interventions at once,
    float32 on the device the model's logits come out on (scored there, not on the host).

    ``kind`` is ``ablate`` (each row's vector projected out everywhere) or ``actadd``
    (``coeff`` x each row's vector added to ``layer``'s input). Rows are candidate-major and
    go through the model ``batch_size`` at a time, prompts of similar length together; the
    hooks read the vectors of the rows in flight, and the shared prompt prefix is computed once
    per candidate. For ``actadd``,
    ``start`` (the prompts' recorded layer inputs) lets the passes begin at ``layer``.
    """
    if kind not in ("ablate", "actadd"):
        raise RefdirError(f"unknown candidate intervention {kind!r}")
    k, n = int(vectors.shape[0]), len(prompts)
    vectors = vectors.detach().double()
    per_row = (
        vectors / vectors.norm(dim=-1, keepdim=True) if kind == "ablate" else coeff * vectors
    ).float()
    per_row = per_row.to(cm.device)
    live = DeviceCopies(per_row)  # the vectors of the rows in flight

    def project(x: torch.Tensor) -> torch.Tensor:
        u = live.on(x.device)
        xf = rows_view(x, u.shape[0]).float()
        kept = xf - torch.einsum("btd,bd->bt", xf, u).unsqueeze(-1) * u[:, None, :]
        return kept.to(x.dtype).view(x.shape)

    def shift(x: torch.Tensor) -> torch.Tensor:
        return (x.float() + live.on(x.device)[:, None, :]).to(x.dtype)

    if kind == "ablate":
        hooks: list[Hook] = map_sites(cm.layout.residual_writes, project)
    else:
        hooks = [(cm.layout.layers[layer], "input", map_input(shift))]
    rows = [cm.chat.token_ids(p) for p in prompts]
    # (candidate, prompt) pairs, candidate-major; batches group prompts of similar length
    chunks = by_length([rows[i % n] for i in range(k * n)], batch_size)
    parts: list[torch.Tensor] = []
    in_flight: dict[str, list[int]] = {"rows": []}
    replay = start if kind == "actadd" and layer > 0 else None
    with torch.inference_mode(), hooked(hooks):
        # rows kept from a recording may share a longer prefix: stop where the recording did
        at_most = replay.prefix_len if replay is not None else None
        prefix = SharedPrefix.build(cm, rows, copies=k, at_most=at_most)
        if replay is not None:
            replay.check(rows, prefix.length)
        with replay.start_at(cm, layer, in_flight) if replay is not None else nullcontext():
            for chunk in chunks:
                index = torch.tensor(chunk, dtype=torch.long)
                owner = index // n
                live.set(per_row[owner.to(per_row.device)])
                in_flight["rows"] = (index % n).tolist()
                batch_rows = [rows[i] for i in in_flight["rows"]]
                parts.append(prefix.logits(cm, batch_rows, owner, on_host=False))
    return unsort(parts, chunks).view(k, n, -1)


def random_direction_kl(
    cm: ChatModel,
    prompts: Sequence[str],
    n: int = 16,
    seed: int = 0,
    baseline: torch.Tensor | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """The KL score of ``n`` random directions: for each, the mean over ``prompts`` of
    KL(baseline || ablated) at the last position, float64 [n].

    The directions are Gaussian in the residual stream (seeded, normalised in float64) and are
    ablated everywhere, exactly as a candidate is (:func:`candidate_logits`, all ``n`` in the
    same batches). They give the KL that removing a direction with no special role costs this
    model, against which a refusal direction's KL score can be read: a small model's residual
    stream has few dimensions, so any one of them carries more. ``baseline``: the prompts'
    last-position logits, if already computed."""
    if n < 1:
        raise RefdirError(f"asked for {n} random directions; ask for 1 or more (--random-kl N)")
    check_baseline(baseline, prompts)
    if baseline is None:
        baseline = last_position_logits(cm, prompts, batch_size)
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, cm.d_model, generator=generator, dtype=torch.float64)
    kls: list[torch.Tensor] = []
    bar = tqdm(total=n, desc="kl of random directions", disable=not progress, unit="direction")
    for group in vectors.split(_RANDOM_GROUP):  # [group, N, vocab] logits at a time
        ablated = candidate_logits(cm, prompts, group, "ablate", batch_size=batch_size)
        base = baseline.to(ablated.device)
        kls += [kl_divergence(base, logits).mean().cpu() for logits in ablated]
        bar.update(len(group))
    bar.close()
    return torch.stack(kls)


_RANDOM_GROUP = 8
"""Random directions scored together: their logits [8, N, vocab] are held at once."""


@dataclass(frozen=True)
class ValidationSets:
    """The validation prompts that selection scores on, after the paper's filter (harmful kept
    if the refusal metric is > 0, harmless if < 0), with the baseline taken in the filter's own
    passes: last-position logits of the kept prompts and the kept harmless prompts' layer
    inputs (from which the induce passes start)."""

    harmful: list[str]
    harmless: list[str]
    harmful_logits: torch.Tensor
    harmless_logits: torch.Tensor
    start: LayerInputs | None
    sampled: dict[str, int]

    @classmethod
    def build(
        cls,
        cm: ChatModel,
        harmful_val: Sequence[str],
        harmless_val: Sequence[str],
        token_ids: Sequence[int],
        filter_prompts: bool = True,
        batch_size: int = 32,
    ) -> ValidationSets:
        """One pass over each set; ``filter_prompts=False`` keeps every prompt."""
        harmful_logits = last_position_logits(cm, harmful_val, batch_size)
        start, harmless_logits = LayerInputs.record_with_logits(
            cm, [cm.chat.token_ids(p) for p in harmless_val], batch_size
        )
        kept_harmful = [True] * len(harmful_val)
        kept_harmless = [True] * len(harmless_val)
        if filter_prompts:
            kept_harmful = refusal_filter(harmful_logits, token_ids, True).tolist()
            kept_harmless = refusal_filter(harmless_logits, token_ids, False).tolist()
        for name, kept in (("harmful_val", kept_harmful), ("harmless_val", kept_harmless)):
            if not any(kept):
                raise filtered_out(name)
        h = [i for i, k in enumerate(kept_harmful) if k]
        s = [i for i, k in enumerate(kept_harmless) if k]
        return cls(
            [harmful_val[i] for i in h],
            [harmless_val[i] for i in s],
            harmful_logits[h],
            harmless_logits[s],
            start.subset(s) if start is not None else None,
            {"harmful_val": len(harmful_val), "harmless_val": len(harmless_val)},
        )

    def counts(self) -> dict[str, dict[str, int]]:
        """Prompts sampled and kept, per set."""
        kept = {"harmful_val": len(self.harmful), "harmless_val": len(self.harmless)}
        return {k: {"sampled": self.sampled[k], "kept": kept[k]} for k in kept}


def score_candidates(
    cm: ChatModel,
    candidates: Candidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    token_ids: Sequence[int],
    config: SelectionConfig | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    prune: bool = True,
    validation: ValidationSets | None = None,
    stopwatch: Stopwatch | None = None,
) -> CandidateScores:
    """Bypass, induce and KL for every candidate.

    Baselines are computed once (or come with ``validation``, from the filter's passes) and the
    candidates of one layer (one per position) go through
    the model together. The residual stream entering every layer is recorded once for
    harmless_val, so that the induce passes of layer ``l`` start at ``l``. With ``prune`` each
    score is computed only for candidates that :func:`pick` could still choose, one filter at a
    time: induce (harmless_val) for layers
    below the layer filter; KL (harmless_val) where induce >= ``induce_min``; bypass
    (harmful_val) where KL is within the loosest KL bound too. A score left out stays NaN, so
    the pick is the same as without pruning; ``prune=False`` scores every candidate.
    ``stopwatch`` gets the time of each score's passes (``induce``, ``kl``, ``bypass``).
    """
    config = config or SelectionConfig()
    layer_list = list(range(candidates.n_layers)) if layers is None else list(layers)
    n_p, n_l = len(candidates.positions), candidates.n_layers
    scores = {
        k: torch.full((n_p, n_l), math.nan, dtype=torch.float64) for k in ("bypass", "induce", "kl")
    }
    if validation is None:  # the prompts as given, unfiltered
        validation = ValidationSets.build(
            cm, harmful_val, harmless_val, token_ids, False, batch_size
        )
    elif validation.harmful != list(harmful_val) or validation.harmless != list(harmless_val):
        raise RefdirError("the validation baseline belongs to other prompts; build it again")
    base_harmful = refusal_metric(validation.harmful_logits, token_ids).mean().item()
    # the harmless baseline, and the layer inputs that the induce passes start from
    base_logits, start = validation.harmless_logits, validation.start
    base_harmless = refusal_metric(base_logits, token_ids).mean().item()
    kl_bound = max((config.kl_max, *config.fallback_kl_bounds))
    base = base_logits  # moved once to the device the candidates' logits come out on
    if prune:
        below = _below_layer_filter(n_l, config)
        layer_list = [i for i in layer_list if below[i]]
    for layer in tqdm(layer_list, desc="score candidates (layers)", disable=not progress):
        vectors = candidates.diffs[:, layer].float()
        live = [p for p in range(n_p) if float(vectors[p].norm()) > 0.0]  # zero: e.g. layer-0 input
        if not live:
            continue
        with maybe(stopwatch, "induce"):
            added = candidate_logits(
                cm, harmless_val, vectors[live], "actadd", layer, config.coeff, batch_size, start
            )
            for i, p in enumerate(live):
                scores["induce"][p, layer] = refusal_metric(added[i], token_ids).mean().item()
            del added  # [K, N, vocab]: one such tensor at a time on the device
        live = [p for p in live if not prune or scores["induce"][p, layer] >= config.induce_min]
        if not live:
            continue
        with maybe(stopwatch, "kl"):
            ablated = candidate_logits(
                cm, harmless_val, vectors[live], "ablate", batch_size=batch_size
            )
            base = base.to(ablated.device)
            for i, p in enumerate(live):
                scores["kl"][p, layer] = kl_divergence(base, ablated[i]).mean().item()
            del ablated
        live = [p for p in live if not prune or scores["kl"][p, layer] <= kl_bound]
        if not live:
            continue
        with maybe(stopwatch, "bypass"):
            bypassed = candidate_logits(
                cm, harmful_val, vectors[live], "ablate", batch_size=batch_size
            )
            for i, p in enumerate(live):
                scores["bypass"][p, layer] = refusal_metric(bypassed[i], token_ids).mean().item()
    return CandidateScores(
        candidates.positions,
        list(range(n_l)),
        scores["bypass"],
        scores["induce"],
        scores["kl"],
        base_harmful,
        base_harmless,
    )


@dataclass(frozen=True)
class Selection:
    position: int
    layer: int
    bypass: float
    induce: float
    kl: float
    rule: str
    fallback: bool
    passed: torch.Tensor
    n_candidates: int
    n_passed: int


def _below_layer_filter(n_layers: int, config: SelectionConfig) -> torch.Tensor:
    """[n_layers] bool: the layers the paper's layer filter keeps (layer < fraction x L)."""
    return torch.arange(n_layers, dtype=torch.float64) < config.max_layer_fraction * n_layers


def _mask(scores: CandidateScores, config: SelectionConfig, kl_max: float) -> torch.Tensor:
    layer_ok = _below_layer_filter(scores.bypass.shape[1], config)
    finite = (
        torch.isfinite(scores.bypass) & torch.isfinite(scores.induce) & torch.isfinite(scores.kl)
    )
    return finite & (scores.kl <= kl_max) & (scores.induce >= config.induce_min) & layer_ok


def passing(scores: CandidateScores, config: SelectionConfig) -> tuple[torch.Tensor, int]:
    """The candidates that pass the paper's filter ([positions, layers] bool) and how many
    candidates there are (scored, below the layer filter: the same with --score-all)."""
    below = _below_layer_filter(scores.induce.shape[1], config)
    n_candidates = int((torch.isfinite(scores.induce) & below).sum())
    return _mask(scores, config, config.kl_max), n_candidates


def pick(scores: CandidateScores, config: SelectionConfig | None = None) -> Selection:
    """The paper's filter and pick, with the documented fallback when nothing passes."""
    config = config or SelectionConfig()
    frac = config.max_layer_fraction
    paper, n_candidates = passing(scores, config)
    attempts = [(config.kl_max, paper, False)]
    attempts += [
        (b, _mask(scores, config, b), True) for b in config.fallback_kl_bounds if b > config.kl_max
    ]
    for bound, mask, fallback in attempts:
        if not mask.any():
            continue
        masked = torch.where(mask, scores.bypass, torch.full_like(scores.bypass, math.inf))
        flat = int(torch.argmin(masked))
        p, layer = divmod(flat, masked.shape[1])
        rule = (
            f"paper: lowest bypass among candidates with kl <= {config.kl_max}, "
            f"induce >= {config.induce_min}, layer < {frac} L"
        )
        if fallback:
            rule = (
                f"fallback: no candidate passed the paper's filters (kl <= {config.kl_max}, "
                f"induce >= {config.induce_min}, layer < {frac} L); lowest bypass with the KL "
                f"bound relaxed to {bound}"
            )
            log.warning("direction selection: %s", rule)
        return Selection(
            scores.positions[p],
            layer,
            float(scores.bypass[p, layer]),
            float(scores.induce[p, layer]),
            float(scores.kl[p, layer]),
            rule,
            fallback,
            paper,
            n_candidates,
            int(paper.sum()),
        )
    bounds = ", ".join(str(b) for b, _, _ in attempts)
    raise RefdirError(
        f"no candidate passes the filters even with the KL bound relaxed to {bounds}; "
        "inspect selection.json and choose one with --layer and --position"
    )
