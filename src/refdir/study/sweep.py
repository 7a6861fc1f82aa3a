"""``refdir sweep``: the runs of a spec (:mod:`refdir.study.sweep_spec`) as Ray tasks, each the
resumable ``refdir run`` in ``OUT/<name>/``, then ``refdir compare`` over the finished ones.

The same code runs on a laptop (a local Ray started here), on one machine with several GPUs,
or on a cluster (``address``: join a Ray cluster started with Ray's own tools). ``OUT`` must
be a folder every node sees. A run whose folder holds a report made with the same options is
skipped; an interrupted one resumes from its last finished step (the run folder's own
resumption). A failed task is retried ``retries`` times, then reported in one line with its
log, ``OUT/sweep/logs/<name>.log``; the others go on. Ray is an optional dependency
(``pip install 'refdir[sweep]'``), imported only here.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refdir.errors import RefdirError, one_line
from refdir.io import make_folder, write_text
from refdir.study.config import CONFIG_TOML, RunConfig
from refdir.study.sweep_spec import SweepRun, SweepSettings, SweepSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["SweepResult", "log_path", "run_sweep"]

SWEEP_FOLDER = "sweep"
COMPARISON_FOLDER = "comparison"
PROGRESS_SECONDS = 2.0
"""How often the driver looks for runs that started."""


@dataclass
class SweepResult:
    """What a sweep did: the runs finished (those skipped included), skipped as finished
    before, and failed (name: one-line reason), and the comparison it wrote (if any)."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    comparison: Path | None = None
    seconds: float = 0.0


def log_path(out: Path, name: str) -> Path:
    """Where the task of run ``name`` writes its log."""
    return out / SWEEP_FOLDER / "logs" / f"{name}.log"


def is_finished(out: Path, run: SweepRun) -> bool:
    """Whether ``OUT/<name>`` holds a report made with the run's options."""
    folder = out / run.name
    if not (folder / "report.html").is_file() or not (folder / "metrics.json").is_file():
        return False
    try:
        recorded = RunConfig(**tomllib.loads((folder / CONFIG_TOML).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False
    return recorded.result_keys() == run.config.result_keys()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RefdirError(
            "refdir sweep needs Ray; install it with `pip install 'refdir[sweep]'`"
        ) from None
    return ray


def _threads(ray: Any) -> int:
    """The CPUs Ray gave this task (at least one thread)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def _with_log(path: str, fn: Callable[[], Any]) -> Any:
    """``fn`` with refdir's log (and any exception's traceback) appended to ``path``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return fn()
    except BaseException:
        handler.flush()
        with open(path, "a", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def run_task(toml: str, out: str, log: str) -> dict[str, float]:
    """One run, in a Ray worker: ``refdir run --config <toml> --out <out>``, its log in ``log``
    (appended to: one section per attempt). Returns the seconds of each step done now."""
    import torch

    from refdir.study.run import run_pipeline

    ray = _import_ray()
    threads = _threads(ray)
    torch.set_num_threads(threads)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"=== attempt on {os.uname().nodename}, pid {os.getpid()}, {threads} threads\n")
    config = RunConfig(**tomllib.loads(toml))
    try:
        return dict(_with_log(log, lambda: run_pipeline(config, out, progress=False)))
    finally:
        _release(torch)


def _release(torch: Any) -> None:
    """Give back the memory of the run's model: the worker process runs the next task."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_task(run_dirs: Sequence[str], labels: Sequence[str], out: str, log: str) -> str:
    """``refdir compare`` over the finished runs, in a Ray worker (its stability section may
    load the model, so it gets a run's resources)."""
    import torch

    from refdir.report.compare import write_comparison

    torch.set_num_threads(_threads(_import_ray()))
    try:
        html, _, _ = _with_log(log, lambda: write_comparison(run_dirs, out, labels))
    finally:
        _release(torch)
    return str(html)


def _failure(exc: BaseException) -> str:
    """A failed task's reason, in one line: a RefdirError's message, else the exception."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, RefdirError):
        return one_line(str(exc))
    text = str(exc).strip().splitlines()
    name = type(exc).__name__
    return one_line(f"{name}: {text[-1]}" if text else name)


def _resources(ray: Any, runs: Sequence[SweepRun], settings: SweepSettings) -> dict[str, float]:
    """What each task asks Ray for: GPUs where the runs use cuda (or the given number), and
    CPUs: one per GPU task, else the cluster's CPUs split between the runs (or the given
    number)."""
    total = ray.cluster_resources()
    gpus = settings.gpus_per_run
    if gpus is None:
        uses_gpu = any(r.config.device.startswith("cuda") for r in runs) or any(
            r.config.device == "auto" for r in runs
        )
        gpus = 1.0 if uses_gpu and total.get("GPU", 0) > 0 else 0.0
        if any(r.config.device.startswith("cuda") for r in runs) and total.get("GPU", 0) == 0:
            raise RefdirError(
                "the runs use `device='cuda'` but the Ray cluster has no GPU; join one with "
                "GPUs (`address`) or run on `device='cpu'`"
            )
    cpus = settings.cpus_per_run
    if cpus is None:
        cores = float(total.get("CPU", 1.0))
        cpus = 1.0 if gpus > 0 else max(1.0, float(int(cores // max(1, len(runs)))))
    if cpus > total.get("CPU", 0) or gpus > total.get("GPU", 0):
        raise RefdirError(
            f"each run asks for {cpus:g} CPUs and {gpus:g} GPUs but the Ray cluster has "
            f"{total.get('CPU', 0):g} and {total.get('GPU', 0):g}; ask for less "
            "(`cpus_per_run`, `gpus_per_run`)"
        )
    return {"num_cpus": cpus, "num_gpus": gpus}


def _start_ray(ray: Any, address: str | None, cpus: int | None) -> bool:
    """Join the cluster at ``address``, or start a local Ray (with ``cpus`` CPUs, or all); a
    Ray already started in this process is used as it is. Whether this call started it."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        options.update(include_dashboard=False, num_cpus=cpus)
    try:
        ray.init(address=address, **options)
    except ConnectionError as exc:
        raise RefdirError(
            f"no Ray cluster at {address} ({one_line(str(exc))}); start one (`ray start --head`) "
            "or leave out `address` for a local Ray"
        ) from None
    return True


class _Progress:
    """Runs done, running and failed, printed when they change."""

    def __init__(self, out: Path, names: Sequence[str], echo: Callable[[str], None]) -> None:
        self.out, self.echo, self.started_at = out, echo, time.time()
        self.waiting = set(names)
        self.done = self.failed = 0
        self.last = ""

    def _running(self) -> int:
        """Runs whose task has begun an attempt since the sweep started (its log grew)."""
        count = 0
        for name in self.waiting:
            try:
                if log_path(self.out, name).stat().st_mtime >= self.started_at:
                    count += 1
            except OSError:
                continue
        return count

    def show(self, skipped: int) -> None:
        running = self._running()
        queued = len(self.waiting) - running
        line = (
            f"sweep: {self.done} done ({skipped} already), {running} running, "
            f"{queued} waiting, {self.failed} failed"
        )
        if line != self.last:
            self.echo(line)
            self.last = line


def run_sweep(
    spec: SweepSpec,
    out: Path,
    address: str | None = None,
    cpus: int | None = None,
    retries: int | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
    echo: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or resume) every run of ``spec`` under ``out`` on Ray, then compare the finished
    runs into ``out/comparison``. The arguments override the spec's [sweep] settings."""
    start = time.perf_counter()
    settings = SweepSettings(
        retries=spec.settings.retries if retries is None else retries,
        cpus_per_run=spec.settings.cpus_per_run if cpus_per_run is None else cpus_per_run,
        gpus_per_run=spec.settings.gpus_per_run if gpus_per_run is None else gpus_per_run,
    )
    ray = _import_ray()
    make_folder(out / SWEEP_FOLDER / "logs")
    result = SweepResult()
    todo = []
    for run in spec.runs:
        write_text(out / SWEEP_FOLDER / f"{run.name}.toml", run.toml)
        if is_finished(out, run):
            result.skipped.append(run.name)
            result.finished.append(run.name)
        else:
            todo.append(run)
    started = _start_ray(ray, address, cpus)
    try:
        resources = _resources(ray, spec.runs, settings)
        echo(
            f"sweep: {len(spec.runs)} runs ({len(result.skipped)} finished before), each with "
            f"{resources['num_cpus']:g} CPUs and {resources['num_gpus']:g} GPUs"
        )
        # retried here, not by Ray, so that a retry is one line of this sweep's progress, not
        # a raylet's traceback; a worker runs one task after another (torch imported once)
        task = ray.remote(run_task).options(max_retries=0, **resources)
        runs = {run.name: run for run in todo}
        tries = dict.fromkeys(runs, 0)

        def submit(name: str) -> Any:
            tries[name] += 1
            run = runs[name]
            return task.remote(run.toml, str(out / name), str(log_path(out, name)))

        pending = {submit(name): name for name in runs}
        progress = _Progress(out, list(runs), echo)
        progress.show(len(result.skipped))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_SECONDS)
            for ref in ready:
                name = pending.pop(ref)
                try:
                    ray.get(ref)
                except Exception as exc:  # the task's own error, or its worker's death
                    reason = _failure(exc)
                    if tries[name] <= settings.retries:
                        echo(f"retrying: {name} (try {tries[name] + 1}): {reason}")
                        pending[submit(name)] = name
                        continue
                    result.failed[name] = reason
                    progress.failed += 1
                    echo(f"failed: {name}: {reason} (log: {log_path(out, name)})")
                else:
                    result.finished.append(name)
                    progress.done += 1
                progress.waiting.discard(name)
            progress.show(len(result.skipped))
        order = [r.name for r in spec.runs if r.name in result.finished]
        result.finished = order
        if order:
            compare = ray.remote(compare_task).options(max_retries=0, **resources)
            log = out / SWEEP_FOLDER / "logs" / "comparison.log"
            ref = compare.remote(
                [str(out / name) for name in order], order, str(out / COMPARISON_FOLDER), str(log)
            )
            try:
                result.comparison = Path(ray.get(ref))
            except Exception as exc:
                raise RefdirError(
                    f"the comparison of the finished runs failed: {_failure(exc)} (log: {log})"
                ) from None
    finally:
        if started:
            ray.shutdown()
    result.seconds = round(time.perf_counter() - start, 2)
    return result
