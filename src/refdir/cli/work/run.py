"""`refdir run`: the study, and where its time went."""

from __future__ import annotations

from pathlib import Path

import typer

from refdir.study.config import RunConfig
from refdir.study.plan import check_step
from refdir.study.run import run_pipeline

__all__ = ["run"]


def run(config: RunConfig, out: Path, force: str | None, until: str | None) -> None:
    check_step(force, "force")  # before any work
    check_step(until, "until")
    done = run_pipeline(config, out, force=force, until=until)
    for step, seconds in done.items():
        typer.echo(f"{step:10s} {seconds:8.1f} s")
    if (out / "report.html").exists():
        typer.echo(f"report: {out / 'report.html'}")
