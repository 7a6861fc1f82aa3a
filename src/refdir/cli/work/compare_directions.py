"""`refdir compare-directions A B`: two models' refusal directions compared (cosine per layer,
projections onto each other's direction, cross-ablation and cross-addition refusal rates)."""

from __future__ import annotations

import gc
import json
import time
from contextlib import nullcontext
from pathlib import Path

import typer

from refdir.artifacts.comparison import DirectionComparison, DirectionSide
from refdir.data import held_out_prompts
from refdir.errors import RefdirError
from refdir.evaluation.compare_directions import (
    DirectionSource,
    cross_rates,
    layer_cosines,
    projections,
    read_source,
    side,
    vector_cosine,
)
from refdir.evaluation.refusal import check_generation
from refdir.io import output_folder, write_bytes
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions
from refdir.report.direction_figures import COMPARISON_PNG, comparison_figure
from refdir.report.figures import png_bytes

__all__ = ["compare_directions", "text_lines"]


def text_lines(record: DirectionComparison) -> list[str]:
    """The comparison for a terminal."""
    a, b = record.a, record.b
    lines = [
        f"{a.label} (layer {a.layer}, position {a.position}, norm {a.norm:.2f}) against "
        f"{b.label} (layer {b.layer}, position {b.position}, norm {b.norm:.2f}): cosine "
        f"{record.cosine:.3f}"
    ]
    if record.cosine_by_layer is not None:
        cells = " ".join("-" if c is None else f"{c:.2f}" for c in record.cosine_by_layer)
        lines.append(f"cosine per layer (position {record.position}): {cells}")
    for one, other in ((a, b), (b, a)):
        if one.rates is None or one.projections is None:
            continue
        r, p = one.rates, one.projections
        lines.append(
            f"{one.label}: refusal on {record.n_harmful} harmful: baseline "
            f"{r.harmful_baseline:.3f}, own ablated {r.harmful_ablate_own:.3f}, {other.label}'s "
            f"ablated {r.harmful_ablate_other:.3f}; on {record.n_harmless} harmless: baseline "
            f"{r.harmless_baseline:.3f}, own added {r.harmless_add_own:.3f}, {other.label}'s "
            f"added {r.harmless_add_other:.3f}"
        )
        lines.append(
            f"{one.label}: mean projection at layer {other.layer} onto {other.label}'s direction: "
            f"harmful {p.harmful_other[other.layer]:.2f}, harmless "
            f"{p.harmless_other[other.layer]:.2f} (onto its own at layer {one.layer}: "
            f"{p.harmful_own[one.layer]:.2f}, {p.harmless_own[one.layer]:.2f})"
        )
    return lines


def compare_directions(
    a: Path,
    b: Path,
    labels: list[str] | None,
    model_a: str | None,
    model_b: str | None,
    device: str,
    dtype: str,
    harmful: str,
    harmless: str,
    n: int | None,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    measure: bool,
    out: Path | None,
    as_json: bool,
) -> None:
    start = time.perf_counter()
    check_generation(max_new_tokens, batch_size)
    if labels is not None and len(labels) != 2:
        raise RefdirError(f"--labels names the two sides; got {len(labels)} names")
    sources = (read_source(a), read_source(b))
    va, vb = (s.direction for s in sources)
    if va.d_model != vb.d_model:
        raise RefdirError(
            f"{a} is a direction of width {va.d_model} and {b} of width {vb.d_model}; compare "
            "models of the same width"
        )
    names = labels or [va.model, vb.model]
    models = [model_a or va.model, model_b or vb.model]
    position = va.position
    cands = [s.candidates for s in sources]
    by_layer = (
        layer_cosines(cands[0], cands[1], position)
        if cands[0] is not None and cands[1] is not None
        else None
    )
    harmful_prompts = held_out_prompts(harmful, n, seed)
    harmless_prompts = held_out_prompts(harmless, n, seed)
    with output_folder(out) if out is not None else nullcontext():
        sides: list[DirectionSide] = []
        for i, (source, other) in enumerate(((sources[0], sources[1]), (sources[1], sources[0]))):
            sides.append(
                _side(
                    names[i],
                    source,
                    other,
                    ModelOptions(model=models[i], device=device, dtype=dtype),
                    harmful_prompts,
                    harmless_prompts,
                    max_new_tokens,
                    batch_size,
                    not as_json,
                    measure,
                )
            )
        record = DirectionComparison(
            a=sides[0],
            b=sides[1],
            d_model=va.d_model,
            cosine=vector_cosine(va.vector, vb.vector),
            position=position,
            cosine_by_layer=by_layer,
            harmful=harmful,
            harmless=harmless,
            n_harmful=len(harmful_prompts),
            n_harmless=len(harmless_prompts),
            max_new_tokens=max_new_tokens,
            seconds=time.perf_counter() - start,
        )
        if out is not None:
            record.write(out)
            write_bytes(out / COMPARISON_PNG, png_bytes(comparison_figure(record)))
    if as_json:
        typer.echo(json.dumps(record.dump()))
        return
    for line in text_lines(record):
        typer.echo(line)
    if out is not None:
        typer.echo(f"wrote {out / DirectionComparison.FILE} and {COMPARISON_PNG}")


def _side(
    label: str,
    source: DirectionSource,
    other: DirectionSource,
    options: ModelOptions,
    harmful: list[str],
    harmless: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
    measure: bool,
) -> DirectionSide:
    if not measure:
        return side(label, source, options.model, None)
    cm = load_model(options)
    own, theirs = source.direction, other.direction
    if own.d_model != cm.d_model:
        raise RefdirError(
            f"{options.model} has width {cm.d_model} but the direction of {source.path} has "
            f"{own.d_model}; give the model of that direction with --model-a / --model-b"
        )
    result = (
        projections(cm, own, theirs, harmful, harmless, batch_size, progress),
        cross_rates(cm, own, theirs, harmful, harmless, max_new_tokens, batch_size, progress),
    )
    del cm
    gc.collect()
    return side(label, source, options.model, result)
