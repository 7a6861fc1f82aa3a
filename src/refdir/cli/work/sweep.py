"""`refdir sweep`: a spec's runs on Ray, then their comparison."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.study.sweep import run_sweep
from refdir.study.sweep_spec import read_spec

__all__ = ["sweep"]


def sweep(
    spec: Path,
    out: Path,
    address: str | None,
    cpus: int | None,
    retries: int | None,
    cpus_per_run: float | None,
    gpus_per_run: float | None,
) -> None:
    runs = read_spec(spec)  # a bad spec: refused before Ray starts
    result = run_sweep(
        runs, out, address, cpus, retries, cpus_per_run, gpus_per_run, echo=typer.echo
    )
    typer.echo(
        f"sweep: {len(result.finished)} finished ({len(result.skipped)} before), "
        f"{len(result.failed)} failed, in {result.seconds:.1f} s"
    )
    if result.comparison is not None:
        typer.echo(f"comparison: {result.comparison}")
    if result.failed:
        raise typer.Exit(1)
