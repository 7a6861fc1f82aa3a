"""`refdir optimize`: the search, and where to find its results."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.optimize.config import OptimizeConfig
from refdir.optimize.run import BEST
from refdir.optimize.run import optimize as run_optimize

__all__ = ["optimize"]


def optimize(config: OptimizeConfig, out: Path) -> None:
    record = run_optimize(config, out)
    chosen = record.points[record.chosen]
    typer.echo(
        f"{record.trials} trials; front of {len(record.points)} points; chosen ({record.rule}): "
        f"refusal {chosen.refusal_generated} at KL {chosen.kl:.4f} (paper: "
        f"{record.paper.refusal_generated} at {record.paper.kl:.4f})"
    )
    typer.echo(f"front: {out / 'pareto.json'}; page: {out / 'optimize.md'}")
    if (out / BEST).is_dir() and config.export:
        typer.echo(f"checkpoint: {out / BEST}")
