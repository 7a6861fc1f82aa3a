"""Evaluation: completions under an intervention, scored for refusal by markers."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Literal

from refdir.direction import Direction
from refdir.errors import RefdirError
from refdir.generation import generate_ids
from refdir.hooks import hooked
from refdir.intervene import INTERVENTIONS, RowConditions, ablate, add
from refdir.model import ChatModel
from refdir.scoring.markers import is_refusal

__all__ = [
    "INTERVENTIONS",
    "Intervention",
    "Job",
    "RefusalEval",
    "check_jobs",
    "evaluate_jobs",
    "evaluate_refusal",
    "intervention",
]

Intervention = Literal["none", "ablate", "actadd"]


def _check(kind: str, has_direction: bool) -> None:
    """Raise unless ``kind`` is an intervention and has the direction it needs."""
    if kind not in INTERVENTIONS:
        raise RefdirError(f"unknown intervention {kind!r}; use one of {', '.join(INTERVENTIONS)}")
    if kind != "none" and not has_direction:
        raise RefdirError(f"--intervention {kind} needs --direction FILE")


def check_jobs(
    jobs: Sequence[tuple[str, float]], has_direction: bool, max_new_tokens: int, batch_size: int
) -> None:
    """One-line errors for generation options, which need no model: (kind, coeff) per job.
    :func:`evaluate_jobs` runs this, and the command line before it loads a model."""
    if max_new_tokens < 1:
        raise RefdirError(f"--max-new-tokens must be 1 or more, got {max_new_tokens}")
    if batch_size < 1:
        raise RefdirError(f"--batch-size must be 1 or more, got {batch_size}")
    for kind, coeff in jobs:
        _check(kind, has_direction)
        if not math.isfinite(coeff):
            raise RefdirError(f"--coeff must be a finite number, got {coeff}")


@contextmanager
def intervention(
    cm: ChatModel, kind: str, direction: Direction | None, coeff: float = 1.0
) -> Iterator[None]:
    """Enter ``none``, ``ablate`` or ``actadd`` (``coeff`` x direction at its layer)."""
    _check(kind, direction is not None)
    if kind == "none" or direction is None:
        scope: Any = nullcontext()
    elif kind == "ablate":
        scope = ablate(cm, direction)
    else:
        scope = add(cm, direction, coeff)
    with scope:
        yield


@dataclass(frozen=True)
class RefusalEval:
    model: str
    prompts: str
    intervention: str
    coeff: float | None
    n: int
    refusal_rate: float
    max_new_tokens: int
    completions: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("completions")
        return data


def evaluate_refusal(
    cm: ChatModel,
    instructions: Sequence[str],
    prompts_name: str,
    kind: str = "none",
    direction: Direction | None = None,
    coeff: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
) -> RefusalEval:
    """Greedy completions under an intervention, and their refusal rate by markers."""
    job = Job(prompts_name, list(instructions), kind, coeff)
    return evaluate_jobs(cm, [job], direction, max_new_tokens, batch_size, progress)[0]


@dataclass(frozen=True)
class Job:
    """Prompts to complete under one intervention (``coeff``: the actadd coefficient)."""

    name: str
    instructions: list[str]
    kind: str = "none"
    coeff: float = 1.0


def evaluate_jobs(
    cm: ChatModel,
    jobs: Sequence[Job],
    direction: Direction | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
) -> list[RefusalEval]:
    """:func:`evaluate_refusal` for several jobs at once: all their prompts decode in the same
    batches, each row under its own job's intervention
    (:class:`~refdir.intervene.RowConditions`), so the batches stay full until the longest
    answers end. A job's completions are those it gets alone."""
    check_jobs([(j.kind, j.coeff) for j in jobs], direction is not None, max_new_tokens, batch_size)
    conditions = RowConditions(cm, direction, [(job.kind, job.coeff) for job in jobs])
    rows = [cm.chat.token_ids(text) for job in jobs for text in job.instructions]
    variants = [v for v, job in enumerate(jobs) for _ in job.instructions]
    with hooked(conditions.hooks()):
        answers = generate_ids(
            cm,
            rows,
            max_new_tokens,
            batch_size,
            progress,
            variants=variants,
            on_batch=conditions.select,
        )
    texts = list(cm.tokenizer.batch_decode(answers, skip_special_tokens=True))
    results, at = [], 0
    for job in jobs:
        records: list[dict[str, Any]] = [
            {"prompt": p, "completion": c, "refusal": is_refusal(c)}
            for p, c in zip(job.instructions, texts[at : at + len(job.instructions)], strict=True)
        ]
        at += len(job.instructions)
        rate = sum(r["refusal"] for r in records) / len(records) if records else 0.0
        results.append(
            RefusalEval(
                cm.name,
                job.name,
                job.kind,
                job.coeff if job.kind == "actadd" else None,
                len(records),
                rate,
                max_new_tokens,
                records,
            )
        )
    return results
