"""`refdir suffix`: search a suffix and analyse it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from refdir.data import held_out_prompts, sample_prompts
from refdir.directions.direction import Direction
from refdir.io import output_folder
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions
from refdir.suffix.experiment import run_suffix_experiment
from refdir.suffix.search import SuffixConfig

__all__ = ["suffix"]


def suffix(
    direction: Path,
    out: Path,
    options: ModelOptions,
    search: dict[str, Any],
    prompts: str,
    n_prompts: int,
    eval_prompts: str,
    n_eval: int,
    top_heads: int,
    max_new_tokens: int,
    keep_completions: bool,
    seed: int,
    any_model: bool,
) -> None:
    config = SuffixConfig(**search)
    chosen = Direction.load(direction, any_model=any_model)
    train = sample_prompts(prompts, n_prompts, seed)
    held_out = held_out_prompts(eval_prompts, n_eval, seed, exclude=train)
    with output_folder(out):  # a bad --out: before the model loads
        cm = load_model(options)
        record = run_suffix_experiment(
            cm,
            chosen,
            out,
            train,
            held_out,
            config,
            eval_name=eval_prompts,
            n_top=top_heads,
            max_new_tokens=max_new_tokens,
            keep_completions=keep_completions,
        )
    rates = record.refusal_rate
    typer.echo(f"suffix {record.suffix!r} ({record.seconds:.0f} s)")
    typer.echo(
        f"refusal rate on {record.n_eval} {eval_prompts}: without {rates.without:.3f}, "
        f"with {rates.with_:.3f}, random {rates.random:.3f}"
    )
    typer.echo(f"wrote {out / 'suffix.json'}, analysis.json, history.json, figures")
