"""The refusal score: greedy completions under an intervention, scored for refusal by markers
(a reasoning model's on the answer after its think block, :mod:`refdir.model.thinking`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from refdir.artifacts.run import Completion
from refdir.errors import RefdirError
from refdir.interventions.intervention import NONE, Intervention
from refdir.interventions.rows import RowConditions
from refdir.model.chat_model import ChatModel
from refdir.model.generation import answer_texts, generate_ids
from refdir.model.hooks import hooked
from refdir.model.thinking import score_completion

__all__ = [
    "Job",
    "RefusalEval",
    "check_generation",
    "completion_record",
    "evaluate_jobs",
    "evaluate_refusal",
    "no_answer_rate",
    "reasoning_refusal_rate",
]


def check_generation(max_new_tokens: int, batch_size: int) -> None:
    """One-line errors for generation options, which need no model (checked before one loads)."""
    if max_new_tokens < 1:
        raise RefdirError(f"`max_new_tokens` must be 1 or more, got {max_new_tokens}")
    if batch_size < 1:
        raise RefdirError(f"`batch_size` must be 1 or more, got {batch_size}")


@dataclass(frozen=True)
class RefusalEval:
    """Completions of one set of prompts under one intervention, and their refusal rate."""

    model: str
    prompts: str
    intervention: str
    coeff: float | None
    n: int
    refusal_rate: float
    max_new_tokens: int
    completions: list[Completion] = field(repr=False)

    @property
    def no_answer_rate(self) -> float:
        return no_answer_rate(self.completions)

    @property
    def reasoning_refusal_rate(self) -> float | None:
        return reasoning_refusal_rate(self.completions)

    def summary(self) -> dict[str, object]:
        """Everything but the completions."""
        return {
            "model": self.model,
            "prompts": self.prompts,
            "intervention": self.intervention,
            "coeff": self.coeff,
            "n": self.n,
            "refusal_rate": self.refusal_rate,
            "max_new_tokens": self.max_new_tokens,
            "no_answer_rate": self.no_answer_rate,
            "reasoning_refusal_rate": self.reasoning_refusal_rate,
        }


def _fraction(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def no_answer_rate(records: Sequence[Completion]) -> float:
    """Fraction cut off inside a reasoning model's think block (0 for other models)."""
    return _fraction([not r.answered for r in records])


def reasoning_refusal_rate(records: Sequence[Completion]) -> float | None:
    """Fraction whose think block holds a refusal marker (None: no completion has one)."""
    marks = [r.reasoning_refusal for r in records if r.reasoning_refusal is not None]
    return _fraction(marks) if marks else None


def completion_record(prompt: str, completion: str, opened: bool = False) -> Completion:
    """One completion with its refusal scored on its answer
    (:func:`~refdir.model.thinking.score_completion`); ``opened``: the generation prompt opened
    a think block."""
    scored = score_completion(completion, opened)
    return Completion(
        prompt=prompt,
        completion=completion,
        refusal=scored.refusal,
        answered=scored.answered,
        reasoning_refusal=scored.reasoning_refusal,
    )


@dataclass(frozen=True)
class Job:
    """Prompts to complete under one intervention."""

    name: str
    instructions: list[str]
    intervention: Intervention = NONE


def evaluate_refusal(
    cm: ChatModel,
    instructions: Sequence[str],
    prompts_name: str,
    intervention: Intervention = NONE,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
) -> RefusalEval:
    """Greedy completions under an intervention, and their refusal rate by markers."""
    job = Job(prompts_name, list(instructions), intervention)
    return evaluate_jobs(cm, [job], max_new_tokens, batch_size, progress)[0]


def evaluate_jobs(
    cm: ChatModel,
    jobs: Sequence[Job],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
) -> list[RefusalEval]:
    """:func:`evaluate_refusal` for several jobs at once: all their prompts decode in the same
    batches, each row under its own job's intervention
    (:class:`~refdir.interventions.rows.RowConditions`), so the batches stay full until the
    longest answers end. A job's completions are those it gets alone."""
    check_generation(max_new_tokens, batch_size)
    conditions = RowConditions(cm, [job.intervention for job in jobs])
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
    texts = answer_texts(cm, answers)
    results, at = [], 0
    for job in jobs:
        records = [
            completion_record(p, c, cm.chat.opens_reasoning)
            for p, c in zip(job.instructions, texts[at : at + len(job.instructions)], strict=True)
        ]
        at += len(job.instructions)
        rate = _fraction([r.refusal for r in records])
        kind = job.intervention.kind
        results.append(
            RefusalEval(
                cm.name,
                job.name,
                kind,
                job.intervention.coeff if kind == "actadd" else None,
                len(records),
                rate,
                max_new_tokens,
                records,
            )
        )
    return results
