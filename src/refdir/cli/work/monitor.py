"""`refdir monitor`: the refusal direction as a monitor of harmful prompts, against a logistic
probe, plain, with an adversarial suffix (``--suffix``) and with a random one."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import typer

from refdir.artifacts.monitor import MonitorRecord
from refdir.artifacts.suffix import SuffixRecord
from refdir.data import held_out_prompts, sample_prompts
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.monitor_study import PLAIN, PromptPair, monitor_study
from refdir.io import output_folder, write_bytes
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions
from refdir.report.monitor_section import monitor_figures
from refdir.suffix.search import random_suffix_ids, suffix_text

__all__ = ["monitor", "summary"]

RANDOM_TOKENS = 16
"""Token length of the random suffix when no `refdir suffix` folder gives one (its default)."""


def _suffix_record(path: Path) -> SuffixRecord:
    folder = path.parent if path.suffix == ".json" else path
    if not (folder / SuffixRecord.FILE).exists():
        raise RefdirError(
            f"--suffix {path} holds no {SuffixRecord.FILE}; give the --out folder of `refdir "
            "suffix` (or a run's suffix/ folder)"
        )
    return SuffixRecord.read(folder)


def summary(record: MonitorRecord) -> dict[str, object]:
    """The JSON line: the direction's plain-prompt figures first, then the whole table and the
    per-layer AUROC of each scorer and condition."""
    plain = record.cell("direction", PLAIN)
    return {
        "auroc": plain.auroc,
        "auroc_ci": [plain.auroc_low, plain.auroc_high],
        "tpr_at_1pct_fpr": plain.tpr_at_1pct_fpr,
        "tpr_ci": [plain.tpr_low, plain.tpr_high],
        "layer": record.layer,
        "position": record.position,
        "chosen_by": record.chosen_by,
        "n_harmful": record.n_harmful,
        "n_harmless": record.n_harmless,
        "n_train_harmful": record.n_train_harmful,
        "n_train_harmless": record.n_train_harmless,
        "n_val_harmful": record.n_val_harmful,
        "n_val_harmless": record.n_val_harmless,
        "table": [cell.model_dump() for cell in record.table],
        "per_layer_auroc": {f"{c.scorer}/{c.condition}": c.auroc for c in record.curves},
        "seconds": record.seconds,
    }


def monitor(
    options: ModelOptions,
    direction: Path,
    harmful: str,
    harmless: str,
    n: int | None,
    train_harmful: str,
    train_harmless: str,
    n_train: int,
    val_harmful: str | None,
    val_harmless: str | None,
    n_val: int,
    layer: int | None,
    position: int | None,
    suffix: Path | None,
    random_suffix: bool,
    n_bootstrap: int,
    seed: int,
    batch_size: int,
    out: Path | None,
    as_json: bool,
    any_model: bool,
) -> None:
    chosen = Direction.load(direction, any_model=any_model)
    found = _suffix_record(suffix) if suffix is not None else None
    train = PromptPair(
        sample_prompts(train_harmful, n_train, seed),
        sample_prompts(train_harmless, n_train, seed),
        train_harmful,
        train_harmless,
    )
    val = None
    if val_harmful is not None and val_harmless is not None:
        exclude = train.harmful + train.harmless
        val = PromptPair(
            held_out_prompts(val_harmful, n_val, seed, exclude),
            held_out_prompts(val_harmless, n_val, seed, exclude),
            val_harmful,
            val_harmless,
        )
    used = [*train.harmful, *train.harmless, *(val.harmful + val.harmless if val else [])]
    searched_on = found.instructions if found is not None else []
    test = PromptPair(
        held_out_prompts(harmful, n, seed, [*used, *searched_on]),
        held_out_prompts(harmless, n, seed, used),
        harmful,
        harmless,
    )
    with output_folder(out) if out is not None else nullcontext():
        cm = load_model(options)
        suffixes: dict[str, str] = {}
        if found is not None:
            suffixes["adversarial"] = found.suffix
        if random_suffix:
            suffixes["random"] = (
                found.random_suffix
                if found is not None
                else suffix_text(cm, random_suffix_ids(cm, test.harmful, RANDOM_TOKENS, seed))
            )
        record = monitor_study(
            cm,
            chosen,
            train,
            test,
            val=val,
            suffixes=suffixes,
            layer=layer,
            position=position,
            n_bootstrap=n_bootstrap,
            seed=seed,
            batch_size=batch_size,
            progress=not as_json,
        )
        if out is not None:
            record.write(out)
            for name, png in monitor_figures(record).items():
                write_bytes(out / name, png)
    if as_json:
        typer.echo(json.dumps(summary(record)))
        return
    typer.echo(
        f"monitor at layer {record.layer}, position {record.position} ({record.chosen_by}); "
        f"{record.n_harmful} harmful ({harmful}) against {record.n_harmless} harmless "
        f"({harmless}); probe trained on {record.n_train_harmful} + {record.n_train_harmless}"
    )
    for cell in record.table:
        typer.echo(
            f"  {cell.scorer:9} {cell.condition:11} AUROC {cell.auroc:.3f} "
            f"[{cell.auroc_low:.3f}, {cell.auroc_high:.3f}]  TPR@1%FPR {cell.tpr_at_1pct_fpr:.3f} "
            f"[{cell.tpr_low:.3f}, {cell.tpr_high:.3f}]"
        )
    if out is not None:
        typer.echo(f"wrote {out / MonitorRecord.FILE} and figures")
