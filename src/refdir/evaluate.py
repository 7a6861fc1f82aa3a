"""Evaluation: completions under an intervention, scored for refusal by markers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Literal

from refdir.direction import Direction
from refdir.errors import RefdirError
from refdir.generation import generate
from refdir.intervene import ablate, add
from refdir.model import ChatModel
from refdir.scoring.markers import is_refusal

__all__ = ["INTERVENTIONS", "Intervention", "RefusalEval", "evaluate_refusal", "intervention"]

Intervention = Literal["none", "ablate", "actadd"]
INTERVENTIONS: tuple[str, ...] = ("none", "ablate", "actadd")


@contextmanager
def intervention(
    cm: ChatModel, kind: str, direction: Direction | None, coeff: float = 1.0
) -> Iterator[None]:
    """Enter ``none``, ``ablate`` or ``actadd`` (``coeff`` x direction at its layer)."""
    if kind not in INTERVENTIONS:
        raise RefdirError(f"unknown intervention {kind!r}; use one of {', '.join(INTERVENTIONS)}")
    if kind == "none":
        scope: Any = nullcontext()
    elif direction is None:
        raise RefdirError(f"--intervention {kind} needs --direction FILE")
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
    with intervention(cm, kind, direction, coeff):
        completions = generate(cm, instructions, max_new_tokens, batch_size, progress)
    records: list[dict[str, Any]] = [
        {"prompt": p, "completion": c, "refusal": is_refusal(c)}
        for p, c in zip(instructions, completions, strict=True)
    ]
    rate = sum(r["refusal"] for r in records) / len(records) if records else 0.0
    return RefusalEval(
        cm.name,
        prompts_name,
        kind,
        coeff if kind == "actadd" else None,
        len(records),
        rate,
        max_new_tokens,
        records,
    )
