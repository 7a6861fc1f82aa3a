"""`refdir orthogonalize`: the edited checkpoint (safetensors, a LoRA adapter or GGUF), its
manifest and its model card, from the model in memory, or a safetensors checkpoint streamed
shard by shard from a local folder."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.export import ExportOptions, check_export_folder, export_orthogonalized
from refdir.interventions.streamed import stream_orthogonalized, streams_by_default
from refdir.model.loading import ORGANISM, load_model
from refdir.model.options import ModelOptions
from refdir.organism.load import gguf_location

__all__ = ["gguf_source", "orthogonalize"]


def gguf_source(options: ModelOptions) -> Path | None:
    """The GGUF file the model of ``options`` is loaded from (the organism's base for the
    organism), or None for a model that is not."""
    if options.model == ORGANISM:
        folder, name = gguf_location()
        return folder / name
    path = Path(options.model).expanduser()
    if path.suffix == ".gguf":
        return path
    if options.gguf_file is not None:
        return path / options.gguf_file
    return None


def orthogonalize(
    direction: Path,
    out: Path,
    options: ModelOptions,
    any_model: bool,
    export_format: str = "safetensors",
    gguf_type: str = "F16",
    stream: bool | None = None,
) -> None:
    """Export the model of ``options`` orthogonalized against ``direction`` in
    ``export_format``. A safetensors export is streamed shard by shard when ``stream`` says so,
    or, unless told, when the model is a local sharded checkpoint
    (:func:`~refdir.interventions.streamed.streams_by_default`); the model is loaded otherwise."""
    run = direction if direction.is_dir() else direction.parent
    export = ExportOptions(
        export_format,  # type: ignore[arg-type]  # ExportOptions.check names the choices
        gguf_type,
        gguf_source(options) if export_format == "gguf" else None,
        run,
    )
    export.check()
    check_export_folder(out)  # now, not after loading and checking the model
    chosen = Direction.load(direction, any_model=any_model)
    if stream and export_format != "safetensors":
        raise RefdirError(
            f"--stream writes safetensors only; drop --stream for --format {export_format}"
        )
    if stream is None:
        stream = export_format == "safetensors" and streams_by_default(options.model)
    if stream:
        manifest = stream_orthogonalized(options, chosen, out)
    else:
        manifest = export_orthogonalized(load_model(options), chosen, out, export)
    kind = "exact" if manifest.exact else "approximate"
    typer.echo(
        f"wrote {out} ({manifest.kind}, {kind}; max |logit delta| vs hook ablation = "
        f"{manifest.parity_max_abs_logit_delta:.2e})"
    )
