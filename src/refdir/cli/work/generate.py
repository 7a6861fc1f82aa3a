"""`refdir ablate`, `refdir add` and `refdir evaluate`: greedy completions under an
intervention, and their refusal rate; with `--reference`, the KL against another model."""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import typer

from refdir.cli.text import printable
from refdir.data import sample_prompts
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.kl import Reference, kl_against_reference
from refdir.evaluation.refusal import check_generation, evaluate_refusal
from refdir.interventions.edit import Edit
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
    reference: str | None = None,
    edit: Path | None = None,
) -> None:
    check_generation(max_new_tokens, batch_size)
    # the completions' folder is made and checked now, not after the generation
    folder = output_folder(completions.parent) if completions is not None else nullcontext()
    with folder:
        chosen = Direction.load(direction, any_model=any_model) if direction is not None else None
        intervention = _intervention(kind, chosen, coeff)
        if edit is not None:
            intervention = Intervention.edited(Edit.load(edit))
        instructions = sample_prompts(prompts, n or None, seed)  # 0: all
        if completions is not None:  # a full disk: now, not after the generation
            check_room(completions, completions_bytes(instructions, max_new_tokens))
        # the reference first, then freed: one model in memory at a time
        against = _reference(options, reference, instructions, batch_size) if reference else None
        cm = load_model(options)
        _checked(cm, chosen)
        if intervention.edit is not None:
            intervention.edit.check(cm.layout)
        kl = None  # before the generation: a reference of another vocabulary is refused at once
        if against is not None:
            kl = kl_against_reference(cm, instructions, against, intervention, batch_size)
        result = evaluate_refusal(
            cm, instructions, prompts, intervention, max_new_tokens, batch_size
        )
        if completions is not None:
            write_jsonl(completions, [r.model_dump() for r in result.completions])
    summary = result.summary()
    if against is not None and kl is not None:
        summary |= {
            "reference": against.name,
            "kl_reference": float(kl.mean()),
            "kl_reference_median": float(kl.quantile(0.5)),
            "kl_reference_max": float(kl.max()),
        }
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        for key, value in summary.items():
            typer.echo(printable(f"{key:16s} {value}"))  # the model's name, the file's


def _reference(
    options: ModelOptions, reference: str, instructions: Sequence[str], batch_size: int
) -> Reference:
    """The reference model's last-position logits on the prompts, loaded with the model's own
    options (dtype, device, system prompt, chat template, layout), then freed."""
    try:
        ref_cm = load_model(options.model_copy(update={"model": reference, "gguf_file": None}))
        against = Reference.of(ref_cm, instructions, batch_size)
    except RefdirError as exc:  # which of the two models it is about
        raise RefdirError(f"`reference`: {exc}") from None
    del ref_cm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return against
