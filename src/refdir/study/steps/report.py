"""Step ``report``: the run's timings into ``metrics.json``, then ``report.html`` and
``report.md``."""

from __future__ import annotations

from refdir.artifacts.metrics import MetricsRecord
from refdir.report.run_report import write_report
from refdir.study.state import Run

__all__ = ["record_timings", "step_report"]


def record_timings(run: Run) -> None:
    """Write the timings of the steps whose results are in the folder into metrics.json."""
    metrics = MetricsRecord.read(run.out)
    metrics.model_copy(update=run.timing_fields()).write(run.out)


def step_report(run: Run) -> None:
    record_timings(run)
    write_report(run.out, truncate=run.config.truncate)
