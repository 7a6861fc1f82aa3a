"""`refdir control-vector`: a direction as a llama.cpp control vector."""

from __future__ import annotations

from pathlib import Path

import typer
from gguf import MODEL_ARCH_NAMES

from refdir.cli.work.orthogonalize import gguf_source
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.control_vector import write_control_vector
from refdir.interventions.gguf_export import read_gguf
from refdir.io import writable_folder
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions

__all__ = ["control_vector"]


def _model_hint(options: ModelOptions, model_type: str) -> str:
    """The model's llama.cpp architecture: its GGUF's, else the one gguf names for its type."""
    source = gguf_source(options)
    if source is not None and source.is_file():
        return str(read_gguf(source).fields["general.architecture"].contents())
    known = set(MODEL_ARCH_NAMES.values())
    return model_type if model_type in known else model_type.replace("_", "")


def control_vector(
    direction: Path, out: Path, options: ModelOptions, coeff: float, any_model: bool
) -> None:
    if out.suffix != ".gguf":
        raise RefdirError(f"{out} does not end in .gguf; name the control vector FILE.gguf")
    if out.exists():
        raise RefdirError(f"{out} exists; choose a new `out` file")
    writable_folder(out.parent if str(out.parent) else Path("."))
    chosen = Direction.load(direction, any_model=any_model)
    cm = load_model(options)
    chosen.fits(cm.layout)
    hint = _model_hint(options, str(cm.model.config.get_text_config().model_type))
    write_control_vector(chosen, cm.n_layers, out, hint, coeff)
    typer.echo(
        f"wrote {out} ({coeff:g} x the direction at layer {chosen.layer}, as llama.cpp's "
        f"direction.{chosen.layer - 1}; llama-cli --control-vector {out})"
    )
