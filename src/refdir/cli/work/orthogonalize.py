"""`refdir orthogonalize`: the edited checkpoint and its manifest, from the model in memory or
streamed shard by shard from a local checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.directions.direction import Direction
from refdir.interventions.export import check_export_folder, export_orthogonalized
from refdir.interventions.streamed import stream_orthogonalized, streams_by_default
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions

__all__ = ["orthogonalize"]


def orthogonalize(
    direction: Path, out: Path, options: ModelOptions, any_model: bool, stream: bool | None = None
) -> None:
    """Export the model of ``options`` orthogonalized against ``direction``: streamed shard by
    shard when ``stream`` says so, or, unless told, when the model is a local sharded
    checkpoint (:func:`~refdir.interventions.streamed.streams_by_default`); loaded otherwise."""
    check_export_folder(out)  # now, not after loading and checking the model
    chosen = Direction.load(direction, any_model=any_model)
    if stream is None:
        stream = streams_by_default(options.model)
    if stream:
        manifest = stream_orthogonalized(options, chosen, out)
    else:
        manifest = export_orthogonalized(load_model(options), chosen, out)
    kind = "exact" if manifest.exact else "approximate"
    typer.echo(
        f"wrote {out} ({kind}; max |logit delta| vs hook ablation = "
        f"{manifest.parity_max_abs_logit_delta:.2e})"
    )
