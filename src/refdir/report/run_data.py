"""Everything the report reads from a run folder, read through the typed files of
:mod:`refdir.artifacts` (see docs/run-artifacts.md)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.monitor import MonitorRecord
from refdir.artifacts.run import (
    CANDIDATES,
    DIRECTION_TENSOR,
    BenchmarksRecord,
    Completion,
    ConfigRecord,
)
from refdir.artifacts.selection import SelectionRecord
from refdir.artifacts.suffix import SuffixAnalysis, SuffixRecord
from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.errors import RefdirError

__all__ = ["COMPLETIONS", "SUFFIX", "RunData", "SuffixData", "held_out_prompts", "load_run"]

COMPLETIONS = "completions"
"""The folder of a run's completion files, ``{set}.{condition}.jsonl``."""
SUFFIX = "suffix"
"""The folder of a run's adversarial-suffix experiment."""
SAMPLES_PER_CONDITION = 3


@dataclass(frozen=True)
class SuffixData:
    """The suffix experiment of a run (``suffix/``)."""

    folder: Path
    record: SuffixRecord
    analysis: SuffixAnalysis
    monitor: MonitorRecord | None = None
    """The direction as a monitor under the suffix (the ``monitor`` step), when it ran."""


@dataclass(frozen=True)
class RunData:
    """Everything the report reads from a run folder."""

    run_dir: Path
    metrics: MetricsRecord
    selection: SelectionRecord
    candidates: Candidates
    direction: Direction
    config: ConfigRecord | None
    completions: dict[tuple[str, str], list[Completion]]
    """The first rows of each completion file, by (set, condition)."""
    benchmarks: BenchmarksRecord | None
    suffix: SuffixData | None


def _redo(step: str) -> str:
    return f"redo it with `force='{step}'`"


def _read_jsonl(path: Path, limit: int) -> list[Completion]:
    """The first ``limit`` rows of a completion file (the rest is not read)."""
    rows: list[Completion] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append(Completion.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError):
                raise RefdirError(
                    f"{path} line {number} is not a completion record; {_redo('evaluate')}"
                ) from None
    return rows


def _completions(run_dir: Path) -> dict[tuple[str, str], list[Completion]]:
    folder = run_dir / COMPLETIONS
    found = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        name, _, condition = path.stem.rpartition(".")
        if name and condition:
            found[(name, condition)] = _read_jsonl(path, SAMPLES_PER_CONDITION)
    return found


def held_out_prompts(run_dir: Path, group: str) -> list[str]:
    """The held-out prompts of a run's ``group`` (harmful, harmless), in its order: those of its
    baseline completions."""
    path = run_dir / COMPLETIONS / f"{group}.baseline.jsonl"
    if not path.is_file():
        raise RefdirError(f"{run_dir} has no {COMPLETIONS}/{path.name}; {_redo('evaluate')}")
    return [row.prompt for row in _read_jsonl(path, sys.maxsize)]


def load_run(run_dir: str | Path) -> RunData:
    """Read a finished run folder; a one-line error for a missing or damaged required file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RefdirError(f"{run_dir} is not a run folder; give the `out` folder of a run")
    metrics = MetricsRecord.read(run_dir)
    selection = SelectionRecord.read(run_dir)
    candidates = Candidates.load(run_dir, CANDIDATES.fix())
    config = ConfigRecord.read(run_dir) if (run_dir / ConfigRecord.FILE).exists() else None
    benchmarks = (
        BenchmarksRecord.read(run_dir) if (run_dir / BenchmarksRecord.FILE).exists() else None
    )
    suffix_dir = run_dir / SUFFIX
    suffix = None
    if (suffix_dir / SuffixRecord.FILE).exists():
        suffix = SuffixData(
            suffix_dir,
            SuffixRecord.read(suffix_dir),
            SuffixAnalysis.read(suffix_dir),
            MonitorRecord.read(suffix_dir) if (suffix_dir / MonitorRecord.FILE).exists() else None,
        )
    return RunData(
        run_dir=run_dir,
        metrics=metrics,
        selection=selection,
        candidates=candidates,
        direction=Direction.load(run_dir, DIRECTION_TENSOR.fix()),
        config=config,
        completions=_completions(run_dir),
        benchmarks=benchmarks,
        suffix=suffix,
    )
