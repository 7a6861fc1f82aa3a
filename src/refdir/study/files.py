"""The files of a ``refdir run`` folder and the step that writes each (declared with the file,
in :mod:`refdir.artifacts`); a step is done when all its files are there."""

from __future__ import annotations

from refdir.artifacts.base import Artifact, RunFile
from refdir.artifacts.direction import DirectionRecord
from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.monitor import MonitorRecord
from refdir.artifacts.run import (
    CANDIDATES,
    DIRECTION_TENSOR,
    REPORT_HTML,
    REPORT_MD,
    BenchmarksRecord,
    PromptSets,
    RefusalTokensRecord,
)
from refdir.artifacts.selection import SelectionRecord
from refdir.artifacts.suffix import SuffixRecord

__all__ = ["COMPLETIONS", "RUN_FILES", "SUFFIX_FOLDER", "written_by"]

SUFFIX_FOLDER = "suffix"
COMPLETIONS = "completions/*.jsonl"
"""The completion files of the evaluate step, kept while the options they depend on stand."""

RUN_FILES: tuple[type[Artifact] | RunFile, ...] = (
    PromptSets,
    RefusalTokensRecord,
    CANDIDATES,
    SelectionRecord,
    DIRECTION_TENSOR,
    DirectionRecord,
    MetricsRecord,
    BenchmarksRecord,
    RunFile(f"{SUFFIX_FOLDER}/{SuffixRecord.FILE}", "suffix"),
    RunFile(f"{SUFFIX_FOLDER}/{MonitorRecord.FILE}", "monitor"),
    REPORT_HTML,
    REPORT_MD,
)
"""The files whose presence marks a step done, in the order the steps write them."""


def written_by(step: str) -> tuple[str, ...]:
    """The files of :data:`RUN_FILES` that ``step`` writes."""
    return tuple(f.FILE for f in RUN_FILES if step == f.STEP)
