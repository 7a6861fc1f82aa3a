"""Step ``benchmarks`` (only with ``benchmarks``): lm-evaluation-harness tasks scored on the
model as it is and with the direction ablated (the paper's Table 2 compares the model with
its orthogonalized copy; the hook ablation is the same model where the export is exact, see
docs/orthogonalization.md)."""

from __future__ import annotations

import logging

from refdir.artifacts.run import DIRECTION_TENSOR, BenchmarksRecord
from refdir.directions.direction import Direction
from refdir.evaluation.benchmarks import benchmark_conditions
from refdir.interventions.intervention import NONE, Intervention
from refdir.study.state import Run

__all__ = ["step_benchmarks"]

log = logging.getLogger(__name__)


def step_benchmarks(run: Run) -> None:
    c = run.config
    log.info("benchmarks: %s", ", ".join(c.benchmarks))
    direction = Direction.load(run.out, DIRECTION_TENSOR.fix())
    results = benchmark_conditions(
        run.cm,
        run.benchmark_tasks or list(c.benchmarks),
        {"baseline": NONE, "ablation": Intervention.ablation(direction)},
        c.benchmark_limit,
        list(c.benchmark_path),
        c.batch_size,
    )
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for condition, by_task in results.items():
        for task, metrics in by_task.items():
            for metric, value in metrics.items():
                scores.setdefault(task, {}).setdefault(metric, {})[condition] = round(value, 6)
    BenchmarksRecord(tasks=list(c.benchmarks), limit=c.benchmark_limit, scores=scores).write(
        run.out
    )
