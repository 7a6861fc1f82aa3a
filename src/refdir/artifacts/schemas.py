"""The JSON Schemas of the typed files, as published in ``docs/schemas/``.

    python -m refdir.artifacts.schemas docs/schemas     # write them again

A test checks that the published ones are current.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from refdir.artifacts.base import Artifact
from refdir.artifacts.comparison import DirectionComparison
from refdir.artifacts.direction import DirectionRecord
from refdir.artifacts.export import ExportManifest
from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.monitor import MonitorRecord
from refdir.artifacts.pareto import HeldoutRecord, ParetoRecord
from refdir.artifacts.run import (
    BenchmarksRecord,
    ConfigRecord,
    PromptSets,
    RefusalTokensRecord,
    RunMarker,
    TimingsRecord,
)
from refdir.artifacts.selection import SelectionRecord
from refdir.artifacts.suffix import SuffixAnalysis, SuffixHistory, SuffixRecord
from refdir.io import make_folder, write_text

__all__ = ["ARTIFACTS", "schema_texts", "write_schemas"]

ARTIFACTS: tuple[type[Artifact], ...] = (
    RunMarker,
    ConfigRecord,
    PromptSets,
    RefusalTokensRecord,
    SelectionRecord,
    DirectionRecord,
    MetricsRecord,
    BenchmarksRecord,
    TimingsRecord,
    SuffixRecord,
    SuffixHistory,
    SuffixAnalysis,
    MonitorRecord,
    ExportManifest,
    ParetoRecord,
    HeldoutRecord,
    DirectionComparison,
)
"""Every typed file, in the order a run writes them."""


def _schema(model: type[Artifact]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    where = (
        f"written by the `{model.STEP}` step of refdir run" if model.STEP else "written by refdir"
    )
    schema["$comment"] = f"{model.FILE}: {where}"
    return schema


def schema_texts() -> dict[str, str]:
    """File name of each schema (``FILE`` with ``.schema.json``) -> its text."""
    return {
        Path(model.FILE).stem + ".schema.json": json.dumps(_schema(model), indent=2) + "\n"
        for model in ARTIFACTS
    }


def write_schemas(folder: Path) -> list[Path]:
    """Write every schema into ``folder``; returns their paths."""
    make_folder(folder)
    paths = []
    for name, text in schema_texts().items():
        write_text(folder / name, text)
        paths.append(folder / name)
    return paths


if __name__ == "__main__":
    for path in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(path)
