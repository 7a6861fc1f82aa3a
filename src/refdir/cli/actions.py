"""The work of each command, with the library, once its options are checked; what it prints."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import typer
from pydantic import ValidationError

from refdir.data import held_out_prompts, sample_prompts
from refdir.directions.direction import Direction
from refdir.directions.extraction import extract_candidates
from refdir.errors import RefdirError
from refdir.evaluation.refusal import check_generation, evaluate_refusal
from refdir.interventions.export import check_export_folder, export_orthogonalized
from refdir.interventions.intervention import NONE, Intervention
from refdir.io import output_folder, write_jsonl
from refdir.model.chat_model import ChatModel
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions
from refdir.organism.build import build_organism
from refdir.organism.recipe import OrganismRecipe
from refdir.report.compare import write_comparison
from refdir.study.config import RunConfig
from refdir.study.plan import check_step
from refdir.study.run import run_pipeline
from refdir.suffix.experiment import run_suffix_experiment
from refdir.suffix.search import SuffixConfig

__all__ = [
    "compare",
    "evaluate",
    "extract",
    "generate_under",
    "organism_build",
    "orthogonalize",
    "run",
    "suffix",
]


def extract(
    out: Path,
    options: ModelOptions,
    harmful: str,
    harmless: str,
    n_train: int,
    layer: int | None,
    position: int,
    seed: int,
    batch_size: int,
) -> None:
    with output_folder(out):  # made and checked now, not after the passes
        harmful_prompts = sample_prompts(harmful, n_train, seed)
        harmless_prompts = sample_prompts(harmless, n_train, seed)
        cm = load_model(options)
        if layer is not None and not 0 <= layer <= cm.n_layers:  # check before the passes
            raise RefdirError(f"--layer must be in 0..{cm.n_layers} for this model, got {layer}")
        if position >= 0 or -position > cm.chat.n_post:
            raise RefdirError(
                f"--position must be in -{cm.chat.n_post}..-1 (the post-instruction tokens), "
                f"got {position}"
            )
        cands = extract_candidates(
            cm,
            harmful_prompts,
            harmless_prompts,
            batch_size,
            harmful_name=harmful,
            harmless_name=harmless,
        )
        chosen = cands.direction(  # before anything is saved: both files, or neither
            position,
            cm.n_layers // 2 if layer is None else layer,
            rule="default: --layer/--position" if layer is not None else "default: middle layer",
        )
        cands.save(out / "candidates.safetensors")
        chosen.save(out)
        typer.echo(f"candidates {tuple(cands.diffs.shape)} -> {out / 'candidates.safetensors'}")
        typer.echo(
            f"direction layer={chosen.layer} position={chosen.position} norm={chosen.norm:.3f} "
            f"-> {out / 'direction.safetensors'}"
        )


def _intervention(kind: str, direction: Direction | None, coeff: float) -> Intervention:
    if kind == "none" or direction is None:
        return NONE
    return Intervention(kind, direction, coeff)  # type: ignore[arg-type]  # checked there


def _checked(cm: ChatModel, direction: Direction | None) -> None:
    if direction is not None:
        direction.check(cm.d_model, cm.n_layers)


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
) -> None:
    check_generation(max_new_tokens, batch_size)  # before the model loads
    chosen = Direction.load(direction)
    intervention = _intervention(kind, chosen, coeff)
    instructions = sample_prompts(prompts, n or None, seed)  # 0: all
    cm = load_model(options)
    _checked(cm, chosen)
    result = evaluate_refusal(cm, instructions, prompts, intervention, max_new_tokens, batch_size)
    for record in result.completions:
        if as_json:
            typer.echo(json.dumps({"prompt": record.prompt, "completion": record.completion}))
        else:
            typer.echo(f"### {record.prompt}\n{record.completion.strip()}\n")
    if not as_json:
        typer.echo(f"refusal rate (markers): {result.refusal_rate:.3f} of {result.n}", err=True)


def orthogonalize(direction: Path, out: Path, options: ModelOptions) -> None:
    check_export_folder(out)  # now, not after loading and checking the model
    chosen = Direction.load(direction)
    manifest = export_orthogonalized(load_model(options), chosen, out)
    kind = "exact" if manifest.exact else "approximate"
    typer.echo(
        f"wrote {out} ({kind}; max |logit delta| vs hook ablation = "
        f"{manifest.parity_max_abs_logit_delta:.2e})"
    )


def organism_build(out: Path, recipe: Path | None, threads: int | None) -> None:
    overrides: dict[str, Any] = {}
    if recipe is not None:
        try:
            overrides = json.loads(recipe.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RefdirError(f"cannot read the recipe {recipe}: {exc}") from None
        if not isinstance(overrides, dict):
            raise RefdirError(f"the recipe {recipe} must be a JSON object of recipe fields")
    try:
        chosen = OrganismRecipe(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "recipe"
        raise RefdirError(f"bad recipe {recipe}: {where}: {error['msg']}") from None
    if threads is not None:
        torch.set_num_threads(threads)
    path = build_organism(chosen, out)
    typer.echo(f"adapter written to {path}")


def run(config: RunConfig, out: Path, force: str | None, until: str | None) -> None:
    check_step(force, "force")  # before any work
    check_step(until, "until")
    done = run_pipeline(config, out, force=force, until=until)
    for step, seconds in done.items():
        typer.echo(f"{step:10s} {seconds:8.1f} s")
    if (out / "report.html").exists():
        typer.echo(f"report: {out / 'report.html'}")


def compare(runs: list[Path], out: Path, labels: list[str] | None) -> None:
    html_path, md_path, csv_path = write_comparison(runs, out, labels)
    typer.echo(f"wrote {html_path}, {md_path.name} and {csv_path.name}")


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
) -> None:
    check_generation(max_new_tokens, batch_size)
    # the completions' folder is made and checked now, not after the generation
    folder = output_folder(completions.parent) if completions is not None else nullcontext()
    with folder:
        chosen = Direction.load(direction) if direction is not None else None
        intervention = _intervention(kind, chosen, coeff)
        instructions = sample_prompts(prompts, n or None, seed)  # 0: all
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
            typer.echo(f"{key:16s} {value}")


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
) -> None:
    config = SuffixConfig(**search)
    chosen = Direction.load(direction)
    train = sample_prompts(prompts, n_prompts, seed)
    held_out = held_out_prompts(eval_prompts, n_eval, seed, exclude=train)
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
