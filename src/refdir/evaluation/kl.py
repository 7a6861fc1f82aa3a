"""The KL score: KL(baseline || intervened) of the next-token distribution at the last prompt
position, per prompt and on average; how it is spread over prompts; and the same for random
directions, a reference for what removing any one direction costs the model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from refdir.artifacts.metrics import Group, KlReference, KlSpread
from refdir.directions.scoring import candidate_logits
from refdir.errors import RefdirError
from refdir.interventions.intervention import Intervention
from refdir.measures import kl_divergence
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits

__all__ = [
    "check_baseline",
    "kl_by_prompt",
    "kl_last_position",
    "kl_summary",
    "random_direction_kl",
    "random_kl_summary",
]


def kl_last_position(
    cm: ChatModel,
    prompts: Sequence[str],
    intervention: Intervention,
    baseline: torch.Tensor | None = None,
    batch_size: int = 32,
) -> float:
    """Mean KL(baseline || intervened) of the next-token distribution at the last prompt
    position (the paper's KL score). ``baseline``: precomputed ``last_position_logits``."""
    return float(kl_by_prompt(cm, prompts, intervention, baseline, batch_size).mean())


def kl_by_prompt(
    cm: ChatModel,
    prompts: Sequence[str],
    intervention: Intervention,
    baseline: torch.Tensor | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """The KL of :func:`kl_last_position` for each prompt: float64 [N], in the prompts' order."""
    check_baseline(baseline, prompts)
    intervention.hooks(cm)  # validate before any pass
    if baseline is None:
        baseline = last_position_logits(cm, prompts, batch_size)
    with intervention.apply(cm):
        intervened = last_position_logits(cm, prompts, batch_size)
    return kl_divergence(baseline, intervened)


def kl_summary(kl: torch.Tensor, refused: Sequence[bool]) -> KlSpread:
    """How a per-prompt KL [N] is spread: median, 90th percentile and maximum, and the mean
    over the prompts the model refused at baseline and over those it answered (turning a
    refusal into an answer is what ablation is for; a large KL on answered prompts is damage)."""
    if kl.dim() != 1 or kl.numel() != len(refused) or kl.numel() == 0:
        raise RefdirError(f"got {kl.numel()} KL values for {len(refused)} prompts")
    values = kl.double()
    mask = torch.tensor([bool(r) for r in refused])

    def group(keep: torch.Tensor) -> Group:
        n = int(keep.sum())
        return Group(n=n, mean=round(float(values[keep].mean()), 5) if n else None)

    return KlSpread(
        **_quantiles(values, {"median": 0.5, "p90": 0.9, "max": 1.0}),
        refused_at_baseline=group(mask),
        answered_at_baseline=group(~mask),
    )


def _quantiles(values: torch.Tensor, at: dict[str, float]) -> dict[str, float]:
    """``values`` (float64) at the named quantiles, rounded to 5 digits."""
    return {name: round(float(values.quantile(q)), 5) for name, q in at.items()}


def random_kl_summary(reference: torch.Tensor, chosen: float, seed: int) -> KlReference:
    """How the KL score ``chosen`` of a direction compares with that of random directions
    (``reference``, from :func:`random_direction_kl` with ``seed``): their
    spread, and the fraction of them whose ablation costs less than the chosen direction's."""
    if reference.dim() != 1 or reference.numel() == 0:
        raise RefdirError(f"expected a non-empty vector of KL values, got {tuple(reference.shape)}")
    values = reference.double()
    return KlReference(
        n=int(values.numel()),
        seed=seed,
        **_quantiles(values, {"median": 0.5, "p10": 0.1, "p90": 0.9, "min": 0.0, "max": 1.0}),
        below_chosen=round(float((values < chosen).double().mean()), 4),
    )


def check_baseline(baseline: torch.Tensor | None, prompts: Sequence[str]) -> None:
    """Raise unless there are ``prompts`` and ``baseline``, when given, holds last-position
    logits [N, vocab] for the N of them."""
    if not prompts:
        raise RefdirError("no prompts to compute the KL divergence on")
    if baseline is not None and (baseline.dim() != 2 or baseline.shape[0] != len(prompts)):
        raise RefdirError(
            f"baseline logits have shape {tuple(baseline.shape)}; expected [{len(prompts)}, vocab]"
        )


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
        raise RefdirError(f"asked for {n} random directions; ask for 1 or more (`n_random_kl`)")
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
