"""What running studies as a Ray sweep costs, on tiny models: Ray's start-up, the cost of one
task, and a sweep of N tiny runs against the same runs one after another in this process
(the baseline, measured in the same run, with the same comparison at the end).

A tiny run takes about a second, so the sweep's own cost is what is measured: the local Ray's
start-up, a worker's first import of torch and refdir (paid once per worker, which runs the
job's later tasks), and the scheduling of each task. Sweeps run on a local Ray of ``--cpus``
CPUs: one run at a time (each run given every CPU, the per-task cost) and runs side by side
(one CPU each).

    python bench/sweep_overhead.py [--runs 4] [--cpus 2] [--tasks 20]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=20)
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
    for run in runs:
        run_pipeline(run.config, root / "sequential" / run.name, progress=False)
    write_comparison(
        [root / "sequential" / r.name for r in runs],
        root / "sequential" / "comparison",
        [r.name for r in runs],
    )
    sequential = time.perf_counter() - start
    print(f"{args.runs} tiny runs one after another, in this process: {sequential:.1f} s")

    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - start
    print(f"local Ray start-up ({args.cpus} CPUs): {started:.2f} s")
    task = ray.remote(noop).options(num_cpus=1)
    start = time.perf_counter()
    ray.get(task.remote())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.tasks):
        ray.get(task.remote())
    each = (time.perf_counter() - start) / args.tasks
    print(f"an empty task: the first {first:.2f} s (a worker starts), then {each * 1000:.1f} ms")

    results = {}
    for label, cpus in (("one at a time", float(args.cpus)), ("side by side", 1.0)):
        out = root / label.replace(" ", "-")
        start = time.perf_counter()
        result = run_sweep(spec, out, cpus_per_run=cpus, echo=lambda line: None)
        results[label] = time.perf_counter() - start
        assert len(result.finished) == args.runs and not result.failed
        print(
            f"sweep, {label} ({cpus:g} CPUs per run): {results[label]:.1f} s, "
            f"x{results[label] / sequential:.2f} the sequential time; "
            f"{(results[label] - sequential) / args.runs:+.2f} s per run"
        )
    start = time.perf_counter()
    again = run_sweep(spec, root / "side-by-side", cpus_per_run=1.0, echo=lambda line: None)
    resumed = time.perf_counter() - start
    assert again.skipped == [r.name for r in runs]
    print(
        f"the same sweep again (every run finished: skipped, only the comparison): {resumed:.1f} s"
    )
    ray.shutdown()
    print(f"(files under {root})")


if __name__ == "__main__":
    main()
