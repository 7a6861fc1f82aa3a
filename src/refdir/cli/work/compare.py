"""`refdir compare`: runs side by side."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.report.compare import write_comparison

__all__ = ["compare"]


def compare(runs: list[Path], out: Path, labels: list[str] | None, cross_eval: bool) -> None:
    html_path, md_path, csv_path = write_comparison(runs, out, labels, cross_eval=cross_eval)
    typer.echo(f"wrote {html_path}, {md_path.name} and {csv_path.name}")
