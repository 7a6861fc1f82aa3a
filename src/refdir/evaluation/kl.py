"""The KL score: KL(baseline || intervened) of the next-token distribution at the last prompt
position, per prompt and on average; how it is spread over prompts; and the same for random
directions, a reference for what removing any one direction costs the model; and the KL of a
model against another checkpoint of it (:func:`kl_against_reference`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refdir.artifacts.metrics import Group, KlReference, KlSpread
from refdir.directions.scoring import candidate_logits
from refdir.errors import RefdirError
from refdir.interventions.intervention import NONE, Intervention
from refdir.measures import kl_divergence
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits

__all__ = [
    "Reference",
    "check_baseline",
    "kl_against_reference",
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
    return kl_divergence(baseline.to(intervened.device), intervened)


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


@dataclass(frozen=True)
class Reference:
    """What :func:`kl_against_reference` needs of a reference model, kept once the model is
    freed: its next-token logits at the last prompt position (``logits``, [N, vocab] float32,
    on the CPU) and the token ids its chat format gives the prompts (``token_ids``; None: not
    checked), which the model compared with it must share."""

    name: str
    logits: torch.Tensor
    token_ids: list[list[int]] | None = None

    @classmethod
    def of(cls, cm: ChatModel, prompts: Sequence[str], batch_size: int = 32) -> Reference:
        """The reference ``cm`` on ``prompts``: one pass, no intervention."""
        check_baseline(None, prompts)
        ids = [cm.chat.token_ids(text) for text in prompts]
        logits = last_position_logits(cm, prompts, batch_size).float().cpu()
        return cls(cm.name, logits, ids)


def kl_against_reference(
    cm: ChatModel,
    prompts: Sequence[str],
    reference: Reference | torch.Tensor,
    intervention: Intervention = NONE,
    batch_size: int = 32,
) -> torch.Tensor:
    """KL(reference || model) of the next-token distribution at the last prompt position for
    each prompt, float64 [N]: ``cm`` under ``intervention`` against another model's logits on
    the same ``prompts`` (a :class:`Reference`, or its logits [N, vocab] alone). Two checkpoints
    compare this way, an orthogonalized export against its original included. A reference whose
    vocabulary differs (another number of logits, or other token ids for the prompts) is
    refused: the two distributions would not be over the same tokens."""
    ref = reference if isinstance(reference, Reference) else Reference("", reference)
    check_baseline(ref.logits, prompts)
    width = _logit_width(cm, prompts)
    if width != ref.logits.shape[1]:
        raise RefdirError(
            f"{_named(ref)} gives {ref.logits.shape[1]} logits per position and {cm.name!r} "
            f"{width}: the KL needs one vocabulary; give a `reference` with the tokenizer of "
            f"{cm.name!r} (another checkpoint of the same model, such as its original or an export)"
        )
    if ref.token_ids is not None:
        _check_tokens(cm, prompts, ref, ref.token_ids)
    return kl_by_prompt(cm, prompts, intervention, ref.logits, batch_size)


def _named(ref: Reference) -> str:
    return f"the reference {ref.name!r}" if ref.name else "the reference"


def _logit_width(cm: ChatModel, prompts: Sequence[str]) -> int:
    """How many logits ``cm`` gives per position: its unembedding's rows, or one prompt's."""
    unembed = cm.layout.unembed
    weight = getattr(unembed, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return int(last_position_logits(cm, prompts[:1], 1).shape[-1])


def _check_tokens(
    cm: ChatModel, prompts: Sequence[str], ref: Reference, ids: Sequence[Sequence[int]]
) -> None:
    """Raise unless ``cm``'s chat format gives each prompt the token ids (``ids``) that the
    reference's gave it."""
    if len(ids) != len(prompts):
        raise RefdirError(
            f"{_named(ref)} holds token ids for {len(ids)} prompts; expected {len(prompts)}"
        )
    for i, (text, theirs) in enumerate(zip(prompts, ids, strict=True)):
        ours = cm.chat.token_ids(text)
        if ours != list(theirs):
            pairs = zip(ours, theirs, strict=False)
            at = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(theirs)))
            raise RefdirError(
                f"{_named(ref)} and {cm.name!r} turn prompt {i + 1} into different tokens (their "
                f"tokenizers and chat templates give {len(theirs)} and {len(ours)} tokens, the "
                f"first difference at token {at}): the KL needs the same tokens; give a "
                f"`reference` with the tokenizer of {cm.name!r}, or one `chat_template` for both"
            )
