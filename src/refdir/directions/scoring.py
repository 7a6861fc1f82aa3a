"""The paper's three scores of every candidate direction (section 2.3 and appendix C), each a
mean over the validation prompts at the last position:

* bypass: the refusal log-odds on harmful_val with the candidate ablated everywhere;
* induce: the refusal log-odds on harmless_val with the candidate added at its layer;
* KL: KL(baseline || ablated) of the next-token distribution on harmless_val.

The candidates of one layer go through the model together, one candidate per row of a batch
(:func:`candidate_logits`); the induce passes start at their layer from recorded inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refdir.directions.candidates import Candidates
from refdir.directions.prompt_filter import filtered_out, refusal_filter
from refdir.directions.selection import CandidateScores, SelectionConfig, below_layer_filter
from refdir.errors import RefdirError
from refdir.measures import KL_EPSILON, REFUSAL_EPSILON, kl_divergence, refusal_metric
from refdir.model.chat import by_length
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits, unsort
from refdir.model.hooks import DeviceCopies, Hook, hooked, map_input, map_sites, rows_view
from refdir.model.layer_inputs import LayerInputs
from refdir.model.prefix import SharedPrefix
from refdir.stopwatch import Stopwatch, maybe

__all__ = ["ValidationSets", "candidate_logits", "score_candidates"]


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
    eps_r, eps_kl = (REFUSAL_EPSILON, KL_EPSILON) if config.epsilons else (0.0, 0.0)
    base_harmful = refusal_metric(validation.harmful_logits, token_ids, eps_r).mean().item()
    # the harmless baseline, and the layer inputs that the induce passes start from
    base_logits, start = validation.harmless_logits, validation.start
    base_harmless = refusal_metric(base_logits, token_ids, eps_r).mean().item()
    kl_bound = max((config.kl_max, *config.fallback_kl_bounds))
    base = base_logits  # moved once to the device the candidates' logits come out on
    if prune:
        below = below_layer_filter(n_l, config)
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
                scores["induce"][p, layer] = (
                    refusal_metric(added[i], token_ids, eps_r).mean().item()
                )
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
                scores["kl"][p, layer] = kl_divergence(base, ablated[i], eps_kl).mean().item()
            del ablated
        live = [p for p in live if not prune or scores["kl"][p, layer] <= kl_bound]
        if not live:
            continue
        with maybe(stopwatch, "bypass"):
            bypassed = candidate_logits(
                cm, harmful_val, vectors[live], "ablate", batch_size=batch_size
            )
            for i, p in enumerate(live):
                scores["bypass"][p, layer] = (
                    refusal_metric(bypassed[i], token_ids, eps_r).mean().item()
                )
    return CandidateScores(
        candidates.positions,
        list(range(n_l)),
        scores["bypass"],
        scores["induce"],
        scores["kl"],
        base_harmful,
        base_harmless,
    )
