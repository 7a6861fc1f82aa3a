"""The front, confirmed: each point's refusals counted by greedy generation and its CE on text,
the points the rule needs confirmed beyond the spread ones, how well the cheap score agreed, and
the point a rule picks for export."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch

from refdir.artifacts.pareto import Agreement, FrontPoint
from refdir.errors import RefdirError
from refdir.evaluation.losses import ce_loss
from refdir.evaluation.refusal import evaluate_refusal
from refdir.interventions.edit import Edit
from refdir.interventions.intervention import Intervention
from refdir.model.chat_model import ChatModel
from refdir.optimize.scorer import Scores

__all__ = ["agreement", "confirm", "fill_next", "knee", "pick", "refine_next"]

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
    """The exported point and the rule, in words: the fewest refusals at KL <= ``max_kl`` (of
    points that refuse as many prompts, the one of least cheap refusal score), the least KL at a
    refusal rate <= ``max_refusal``, or the knee."""
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
        # equal counts of generated refusals: the cheap score, the finer measure, decides
        index = min(fits, key=lambda i: (_rate(points[i]), points[i].refusal_score, points[i].kl))
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


def refine_next(
    front: Sequence[tuple[int, float]],
    confirmed: Mapping[int, FrontPoint],
    max_kl: float | None,
    max_refusal: float | None,
) -> int | None:
    """The next front trial to confirm for the pick rule, or None when the rule's point is
    settled. ``front``: every front trial (number, KL); ``confirmed``: the points confirmed so
    far, by trial number.

    The spread points can straddle the rule's point: with ``max_refusal``, the least-KL point
    that meets the rate may lie between a confirmed point that misses it and the least-KL one
    that meets it. Those in between are bisected by KL (the generated rate falls as KL rises
    along the front), one confirmation per call. With ``max_kl``, the front point of largest KL
    within the bound (the fewest refusals by the cheap score) is confirmed. The knee needs none.
    """
    todo = [(n, kl) for n, kl in front if n not in confirmed]
    if not todo:
        return None
    if max_kl is not None:
        within = [(n, kl) for n, kl in todo if kl <= max_kl]
        best = max((p.kl for p in confirmed.values() if p.kl <= max_kl), default=-1.0)
        top = max(within, key=lambda t: t[1], default=None)
        return top[0] if top is not None and top[1] > best else None
    if max_refusal is None:
        return None
    meets = [p.kl for p in confirmed.values() if _rate(p) <= max_refusal]
    if not meets:
        return None
    upper = min(meets)
    lower = max((p.kl for p in confirmed.values() if p.kl < upper), default=-1.0)
    between = sorted((t for t in todo if lower < t[1] < upper), key=lambda t: t[1])
    return between[len(between) // 2][0] if between else None


def fill_next(
    front: Sequence[tuple[int, float]], confirmed: Mapping[int, FrontPoint], step: float
) -> int | None:
    """The next front trial to confirm where the generated refusal rate falls steeply, or None
    when no two neighbouring confirmed points (by KL) differ by more than ``step`` with a front
    trial between them. ``front`` and ``confirmed`` as for :func:`refine_next`.

    The spread points are even along the front's trials, not along its refusal rate: where the
    rate drops fast (a few hundredths of KL can take it from a quarter of the prompts to none),
    neighbouring spread points can be far apart. The widest such drop is bisected by KL, one
    confirmation per call, so the confirmed front shows its steep part as well as its ends."""
    done = sorted(confirmed.values(), key=lambda p: p.kl)
    todo = [(n, kl) for n, kl in front if n not in confirmed]
    best: tuple[float, int] | None = None
    for a, b in pairwise(done):
        drop = _rate(a) - _rate(b)
        if drop <= step:
            continue
        between = sorted((t for t in todo if a.kl < t[1] < b.kl), key=lambda t: t[1])
        if between and (best is None or drop > best[0]):
            best = (drop, between[len(between) // 2][0])
    return None if best is None else best[1]
