"""`refdir extract`: candidates and a default direction."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.data import sample_prompts
from refdir.directions.extraction import extract_candidates
from refdir.errors import RefdirError
from refdir.io import check_room, output_folder
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions
from refdir.study.room import candidates_bytes

__all__ = ["extract"]


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
        size = candidates_bytes(
            cm.chat.n_post, cm.n_layers, cm.d_model, [*harmful_prompts, *harmless_prompts]
        )
        target = out / "candidates.safetensors"  # a full disk: now, not after the passes
        check_room(target, size + 4 * cm.d_model + 65536, (target, size))
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
