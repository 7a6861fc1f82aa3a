"""``refdir run``: the paper's study of one model, one file per result, resumable.

Steps (:data:`refdir.study.plan.STEPS`): prompts -> extract -> select -> evaluate ->
[benchmarks] -> [suffix] -> report (the bracketed ones only when asked). A step whose files are
there is skipped, so a killed run resumes where it stopped; ``force`` redoes a step and every
step after it. The run folder is described in docs/run-artifacts.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import ValidationError

from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.run import Numerics
from refdir.data import load_prompts
from refdir.evaluation.benchmarks import ResolvedTasks, resolve_tasks
from refdir.io import make_folder
from refdir.model.chat_model import ChatModel
from refdir.model.loading import resolve_device, resolve_dtype
from refdir.study.config import RunConfig, option_error
from refdir.study.folder import claim, forget, locked, mark
from refdir.study.plan import (
    STEP_NAMES,
    STEPS,
    changed_options,
    check_config,
    check_step,
    stale_steps,
)
from refdir.study.room import check_run_room
from refdir.study.state import Run
from refdir.study.steps.evaluate import check_judge
from refdir.study.steps.report import record_timings

__all__ = ["run_pipeline"]

log = logging.getLogger(__name__)


def _check_inputs(config: RunConfig, benchmarks_due: bool) -> ResolvedTasks | None:
    """Fail at once, before any step runs, on options that a later step would reject minutes
    into the run: an unknown prompt set or file, a judge that cannot be built, benchmark tasks
    that cannot be found (only when that step will run; the tasks found are returned for it)."""
    sets = (
        config.harmful_train,
        config.harmless_train,
        config.harmful_val,
        config.harmless_val,
        *config.harmful_eval,
        config.harmless_eval,
    )
    for name in dict.fromkeys(sets):
        load_prompts(name)
    if config.judge is not None or config.judge_model is not None:
        check_judge(config)
    if benchmarks_due:
        return resolve_tasks(config.benchmarks, config.benchmark_path)
    return None


def _benchmarks_due(config: RunConfig, out: Path, force_from: int) -> bool:
    """Whether the benchmarks step will run now (so its tasks must resolve)."""
    benchmarks = STEPS[STEP_NAMES.index("benchmarks")]
    if not benchmarks.enabled(config):
        return False
    forced = force_from <= STEP_NAMES.index("benchmarks")
    return (
        forced
        or not benchmarks.done(out)
        or "benchmarks" in stale_steps(changed_options(config, out))
    )


def run_pipeline(
    config: RunConfig,
    out: str | Path,
    force: str | None = None,
    progress: bool = True,
    model: ChatModel | None = None,
    until: str | None = None,
) -> dict[str, float]:
    """Run (or resume) every step into ``out``; ``force`` redoes that step and the later ones,
    ``until`` stops after that step. Returns the wall time of each step run now."""
    out = Path(out)
    try:  # a config made with model_copy(update=...) was never validated
        config = RunConfig.model_validate(config.model_dump())
    except ValidationError as exc:
        raise option_error(exc) from None
    check_step(force, "force")
    check_step(until, "until")
    force_from = STEP_NAMES.index(force) if force is not None else len(STEPS)
    numerics = _numerics(config, model)  # an unknown device or dtype: before any folder
    fresh = claim(out)
    tasks = _check_inputs(config, _benchmarks_due(config, out, force_from))
    check_run_room(config, out, model, until)  # a full disk or `ulimit -f`: now, not steps later
    made = [p for p in (Path(os.path.abspath(out)), *Path(os.path.abspath(out)).parents)]
    made = [p for p in made if not p.exists()]  # innermost first
    make_folder(out)
    done: dict[str, float] = {}
    with locked(out):  # another run in the folder: refused here, before anything is written
        try:
            check_config(config, out, force_from, numerics)
            mark(out)
            _run_steps(Run(config, out, progress, model), tasks, force_from, until, done)
        except BaseException:
            if fresh and not done:  # nothing to resume: the new folder is gone again
                forget(out, made)
            raise
    return done


def _run_steps(
    run: Run,
    tasks: ResolvedTasks | None,
    force_from: int,
    until: str | None,
    done: dict[str, float],
) -> None:
    """The steps in order, each skipped when its files are there (but the forced ones, whose
    files, and those of every later step, go first, and those that read the files of a step
    that ran just now: a folder written before a step existed gets that step, then its report
    again); ``done`` gets each step's time as it ends."""
    config, out = run.config, run.out
    run.benchmark_tasks = tasks
    for step in STEPS[force_from:]:  # a forced step that fails leaves no later results behind
        step.remove(out)
    last = STEP_NAMES.index(until) if until is not None else len(STEPS) - 1
    for i, step in enumerate(STEPS[: last + 1]):
        if not step.enabled(config):
            continue
        fed = any(name in done for name in step.needs)  # what it read was just rewritten
        if step.done(out) and i < force_from and not fed:
            log.info("step %s: results present, skipped", step.name)
            continue
        log.info("step %s", step.name)
        done[step.name] = run.timed(step.name, lambda step=step: step.run(run))  # type: ignore[misc]
    if done and (out / MetricsRecord.FILE).exists():
        record_timings(run)


def _numerics(config: RunConfig, model: ChatModel | None) -> Numerics:
    """Where the run computes and in what precision: the given model's, else what the options
    resolve to (an unknown or unavailable device, or an unknown dtype, is an error now)."""
    if model is not None:
        dtype = model.layout.embed.weight.dtype
        return Numerics(device=model.device.type, dtype=str(dtype).removeprefix("torch."))
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    kind = "cuda" if device.startswith("cuda") else device
    return Numerics(device=kind, dtype=str(dtype).removeprefix("torch."))
