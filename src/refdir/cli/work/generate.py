"""`refdir ablate`, `refdir add` and `refdir evaluate`: greedy completions under an
intervention, and their refusal rate."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import typer

from refdir.cli.text import printable
from refdir.data import sample_prompts
from refdir.directions.direction import Direction
from refdir.evaluation.refusal import check_generation, evaluate_refusal
from refdir.interventions.intervention import NONE, Intervention
from refdir.io import check_room, output_folder, write_jsonl
from refdir.model.chat_model import ChatModel
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions
from refdir.study.room import completions_bytes

__all__ = ["evaluate", "generate_under"]


def _intervention(kind: str, direction: Direction | None, coeff: float) -> Intervention:
    if kind == "none" or direction is None:
        return NONE
    return Intervention(kind, direction, coeff)  # type: ignore[arg-type]  # checked there


def _checked(cm: ChatModel, direction: Direction | None) -> None:
    if direction is not None:
        direction.fits(cm.layout)


def generate_under(
    kind: str,
    options: ModelOptions,
    direction: Path,
    prompts: str,
    n: int | None,
    max_new_tokens: int,
    batch_size: int,
    as_json: bool,
    coeff: float,
    seed: int,
    any_model: bool,
) -> None:
    check_generation(max_new_tokens, batch_size)  # before the model loads
    chosen = Direction.load(direction, any_model=any_model)
    intervention = _intervention(kind, chosen, coeff)
    instructions = sample_prompts(prompts, n or None, seed)  # 0: all
    cm = load_model(options)
    _checked(cm, chosen)
    result = evaluate_refusal(cm, instructions, prompts, intervention, max_new_tokens, batch_size)
    for record in result.completions:
        if as_json:
            typer.echo(json.dumps({"prompt": record.prompt, "completion": record.completion}))
        else:
            # the prompt file's text and the model's, never raw control characters
            typer.echo(printable(f"### {record.prompt}\n{record.completion.strip()}\n"))
    if not as_json:
        typer.echo(f"refusal rate (markers): {result.refusal_rate:.3f} of {result.n}", err=True)


def evaluate(
    options: ModelOptions,
    prompts: str,
    n: int | None,
    direction: Path | None,
    kind: str,
    coeff: float,
    max_new_tokens: int,
    batch_size: int,
    as_json: bool,
    completions: Path | None,
    seed: int,
    any_model: bool,
) -> None:
    check_generation(max_new_tokens, batch_size)
    # the completions' folder is made and checked now, not after the generation
    folder = output_folder(completions.parent) if completions is not None else nullcontext()
    with folder:
        chosen = Direction.load(direction, any_model=any_model) if direction is not None else None
        intervention = _intervention(kind, chosen, coeff)
        instructions = sample_prompts(prompts, n or None, seed)  # 0: all
        if completions is not None:  # a full disk: now, not after the generation
            check_room(completions, completions_bytes(instructions, max_new_tokens))
        cm = load_model(options)
        _checked(cm, chosen)
        result = evaluate_refusal(
            cm, instructions, prompts, intervention, max_new_tokens, batch_size
        )
        if completions is not None:
            write_jsonl(completions, [r.model_dump() for r in result.completions])
    summary = result.summary()
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        for key, value in summary.items():
            typer.echo(printable(f"{key:16s} {value}"))  # the model's name, the file's
