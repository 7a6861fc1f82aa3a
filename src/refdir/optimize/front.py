"""The front, confirmed: each point's refusals counted by greedy generation and its CE on text,
how well the cheap score agreed, and the point a rule picks for export."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refdir.artifacts.pareto import Agreement, FrontPoint
from refdir.errors import RefdirError
from refdir.evaluation.losses import ce_loss
from refdir.evaluation.refusal import evaluate_refusal
from refdir.interventions.edit import Edit
from refdir.interventions.intervention import Intervention
from refdir.model.chat_model import ChatModel
from refdir.optimize.scorer import Scores

__all__ = ["agreement", "confirm", "knee", "pick"]

TARGET = 0.02
"""The refusal rate the agreement's ``same_side`` is read against."""


def confirm(
    cm: ChatModel,
    edit: Edit,
    scores: Scores,
    trial: int | None,
    label: str,
    harmful: Sequence[str],
    texts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
) -> FrontPoint:
    """A front point, its refusals generated and its CE on ``texts`` measured under ``edit``."""
    result = evaluate_refusal(
        cm,
        harmful,
        "harmful_val",
        Intervention.edited(edit),
        max_new_tokens,
        batch_size,
        progress=False,
    )
    ce = None
    if texts:
        with edit.apply(cm):
            ce = round(ce_loss(cm, texts, progress=False), 5)
    return FrontPoint(
        trial=trial,
        label=label,
        params={k: v for k, v in edit.params.items() if isinstance(v, float | int | bool | str)},
        refusal_score=round(scores.refusal_score, 6),
        refusal_first_token=round(scores.refusal_first_token, 6),
        kl=round(scores.kl, 6),
        refusal_generated=round(result.refusal_rate, 6),
        ce_text=ce,
    )


def _ranks(values: Sequence[float]) -> torch.Tensor:
    x = torch.tensor(values, dtype=torch.float64)
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    for value in x.unique():  # ties share their mean rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def agreement(points: Sequence[FrontPoint]) -> Agreement:
    """How the cheap score and the generated refusal rate agree on the confirmed points."""
    pairs = [(p, p.refusal_generated) for p in points if p.refusal_generated is not None]
    if not pairs:
        raise RefdirError("no front point was confirmed by generation")
    cheap = [p.refusal_first_token for p, _ in pairs]
    made = [g for _, g in pairs]
    diff = sum(abs(a - b) for a, b in zip(cheap, made, strict=True)) / len(pairs)
    side = sum((a <= TARGET) == (b <= TARGET) for a, b in zip(cheap, made, strict=True))
    rho: float | None = None
    score = [p.refusal_score for p, _ in pairs]
    if len(pairs) > 1 and len(set(score)) > 1 and len(set(made)) > 1:
        a, b = _ranks(score), _ranks(made)
        a, b = a - a.mean(), b - b.mean()
        rho = round(float((a @ b) / (a.norm() * b.norm())), 4)
    return Agreement(
        n=len(pairs),
        mean_abs_difference=round(diff, 4),
        rank_correlation=rho,
        same_side=round(side / len(pairs), 4),
    )


def knee(points: Sequence[FrontPoint]) -> int:
    """The index of the front's knee: the point farthest below the line from the lowest-KL
    point to the lowest-refusal point, both axes scaled to the front's range."""
    rates = [_rate(p) for p in points]
    kls = [p.kl for p in points]
    if len(points) < 3:
        return min(range(len(points)), key=lambda i: (rates[i], kls[i]))
    r0, r1 = min(rates), max(rates)
    k0, k1 = min(kls), max(kls)
    x = [(k - k0) / ((k1 - k0) or 1.0) for k in kls]
    y = [(r - r0) / ((r1 - r0) or 1.0) for r in rates]
    # the line from (0, 1) (least KL, most refusals) to (1, 0); distance below it
    return max(range(len(points)), key=lambda i: (1.0 - x[i] - y[i], -kls[i]))


def _rate(point: FrontPoint) -> float:
    return (
        point.refusal_generated
        if point.refusal_generated is not None
        else point.refusal_first_token
    )


def pick(
    points: Sequence[FrontPoint], max_kl: float | None, max_refusal: float | None
) -> tuple[int, str]:
    """The exported point and the rule, in words: the fewest refusals at KL <= ``max_kl``, the
    least KL at a refusal rate <= ``max_refusal``, or the knee."""
    if not points:
        raise RefdirError("the front is empty: no trial completed")
    if max_kl is not None and max_refusal is not None:
        raise RefdirError("give `max_kl` or `max_refusal`, not both")
    if max_kl is not None:
        fits = [i for i, p in enumerate(points) if p.kl <= max_kl]
        if not fits:
            least = min(p.kl for p in points)
            raise RefdirError(
                f"no front point has KL <= {max_kl} (the least is {least:.4g}); raise `max_kl` "
                "or run more trials (`trials`)"
            )
        index = min(fits, key=lambda i: (_rate(points[i]), points[i].kl))
        return index, f"fewest refusals at KL <= {max_kl:g}"
    if max_refusal is not None:
        fits = [i for i, p in enumerate(points) if _rate(p) <= max_refusal]
        if not fits:
            least = min(_rate(p) for p in points)
            raise RefdirError(
                f"no front point refuses at most {max_refusal:g} (the least is {least:.3g}); "
                "raise `max_refusal` or run more trials (`trials`)"
            )
        index = min(fits, key=lambda i: (points[i].kl, _rate(points[i])))
        return index, f"least KL at refusal <= {max_refusal:g}"
    return knee(points), "the knee of the front"
