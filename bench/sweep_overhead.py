"""What running studies as a Ray sweep costs, on tiny models: Ray's start-up, the cost of one
task, and a sweep of N tiny runs against the same runs one after another in this process
(the baseline, measured in the same run, with the same comparison at the end).

A tiny run takes about a second, so the sweep's own cost is what is measured: the local Ray's
start-up, a worker's first import of torch and refdir (paid once per worker, which runs the
job's later tasks), and the scheduling of each task. Sweeps run on a local Ray of ``--cpus``
CPUs: one run at a time (each run given every CPU, the per-task cost) and runs side by side
(one CPU each). Baseline and sweeps alternate ``--repeats`` times; the best of each is shown.

    python bench/sweep_overhead.py [--runs 4] [--cpus 2] [--tasks 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from refdir.report.compare import write_comparison
from refdir.study.run import run_pipeline
from refdir.study.sweep import run_sweep
from refdir.study.sweep_spec import SweepRun, SweepSettings, SweepSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import TINY_RUN, tiny_model, tiny_tokenizer


def noop() -> int:
    return 0


def sequential(runs: tuple[SweepRun, ...], out: Path) -> float:
    """The baseline: the runs one after another in this process, then their comparison."""
    start = time.perf_counter()
    for run in runs:
        run_pipeline(run.config, out / run.name, progress=False)
    write_comparison([out / r.name for r in runs], out / "comparison", [r.name for r in runs])
    return time.perf_counter() - start


def sweep(spec: SweepSpec, out: Path, cpus: float) -> float:
    start = time.perf_counter()
    result = run_sweep(spec, out, cpus_per_run=cpus, echo=lambda line: None)
    assert len(result.finished) == len(spec.runs) and not result.failed
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.cpus)
    root = Path(tempfile.mkdtemp(prefix="refdir-sweep-bench-"))
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    base = TINY_RUN.model_copy(update={"model": str(root / "model")})
    runs = tuple(
        SweepRun(f"seed-{s}", base.model_copy(update={"seed": s})) for s in range(1, args.runs + 1)
    )
    spec = SweepSpec(runs, SweepSettings(retries=0))

    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"local Ray start-up ({args.cpus} CPUs): {time.perf_counter() - start:.2f} s")
    task = ray.remote(noop).options(num_cpus=1)
    start = time.perf_counter()
    ray.get(task.remote())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.tasks):
        ray.get(task.remote())
    each = (time.perf_counter() - start) / args.tasks
    print(f"an empty task: the first {first:.2f} s (a worker starts), then {each * 1000:.1f} ms")

    # alternated, so that a change in the machine's load falls on both; the first sweep's
    # workers import torch and refdir (the cold start), later sweeps of this job reuse them
    times: dict[str, list[float]] = {"sequential": [], "one at a time": [], "side by side": []}
    for i in range(args.repeats):
        times["sequential"].append(sequential(runs, root / f"sequential-{i}"))
        times["one at a time"].append(sweep(spec, root / f"serial-{i}", float(args.cpus)))
        times["side by side"].append(sweep(spec, root / f"parallel-{i}", 1.0))
        print(f"  repeat {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()))
    base_time = min(times["sequential"])
    print(
        f"{args.runs} tiny runs and their comparison, one after another in this process: "
        f"{base_time:.1f} s (best of {args.repeats}; each: "
        + ", ".join(f"{t:.1f}" for t in times["sequential"])
        + ")"
    )
    for label, cpus in (("one at a time", args.cpus), ("side by side", 1)):
        best = min(times[label])
        print(
            f"sweep, {label} ({cpus} CPUs per run): {best:.1f} s, x{best / base_time:.2f} the "
            f"sequential time, {(best - base_time) / args.runs:+.2f} s per run (best of "
            f"{args.repeats}; each: " + ", ".join(f"{t:.1f}" for t in times[label]) + ")"
        )
    start = time.perf_counter()
    again = run_sweep(spec, root / "parallel-0", cpus_per_run=1.0, echo=lambda line: None)
    resumed = time.perf_counter() - start
    assert again.skipped == [r.name for r in runs]
    print(
        f"the same sweep again (every run finished: skipped, only the comparison): {resumed:.1f} s"
    )
    ray.shutdown()
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
