"""`refdir organism build`: the organism's adapter, from a recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import typer
from pydantic import ValidationError

from refdir.errors import RefdirError
from refdir.organism.build import build_organism
from refdir.organism.recipe import OrganismRecipe

__all__ = ["organism_build"]


def organism_build(out: Path, recipe: Path | None, threads: int | None) -> None:
    overrides: dict[str, Any] = {}
    if recipe is not None:
        try:
            overrides = json.loads(recipe.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RefdirError(f"cannot read the recipe {recipe}: {exc}") from None
        if not isinstance(overrides, dict):
            raise RefdirError(f"the recipe {recipe} must be a JSON object of recipe fields")
    try:
        chosen = OrganismRecipe(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "recipe"
        raise RefdirError(f"bad recipe {recipe}: {where}: {error['msg']}") from None
    if threads is not None:
        torch.set_num_threads(threads)
    path = build_organism(chosen, out)
    typer.echo(f"adapter written to {path}")
