"""`refdir sweep` on a local Ray limited to 2 CPUs, on a tiny model saved to a folder: a failing
run reported in one line while the others finish, a rerun that redoes nothing, and a sweep
killed mid-way that, started again, leaves the artifacts of an uninterrupted one."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import filelock
import pytest
import ray
from typer.testing import CliRunner

from refdir.cli import app
from refdir.errors import RefdirError
from refdir.study.sweep import SweepResult, log_path, run_sweep
from refdir.study.sweep_spec import read_spec
from tiny import tiny_model, tiny_tokenizer

runner = CliRunner()

BASE = """
[base]
model = "{model}"
n_train = 6
n_val = 4
harmful_eval = ["jailbreakbench", "harmful_test"]
n_eval_harmful = 2
n_eval_harmless = 2
max_new_tokens = 2
refusal_tokens = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
n_ce = 2
fallback_kl_bounds = [1.0, 1e9]
induce_min = -1e9
filter_prompts = false

[[grid]]
seed = [1, 2]
"""
FAILING = """
[[grid]]
harmful_train = ["no-such-prompts.json"]
"""
RUNS = ["seed-1", "seed-2"]
SKIP = {".refdir-run.lock", "timings.json", "report.html", "report.md"}
"""Files whose bytes may differ between equal runs: the lock and what records wall time."""


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """One local Ray of 2 CPUs for the module's sweeps (they use it as it is); its address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep-spec")
    tiny_model("llama").save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    base = BASE.format(model=folder / "model")
    (folder / "two.toml").write_text(base)
    (folder / "three.toml").write_text(base + FAILING)
    return folder


@pytest.fixture(scope="module")
def first(
    local_ray: str, spec_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, SweepResult, list[str]]:
    """Three runs, one failing on purpose (its prompt file does not exist), retried once."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    lines: list[str] = []
    result = run_sweep(read_spec(spec_dir / "three.toml"), out, retries=1, echo=lines.append)
    return out, result, lines


def _artifacts(run_dir: Path) -> dict[str, object]:
    """Every file of a run, by path: its bytes, metrics.json without its timings."""
    found: dict[str, object] = {}
    for path in sorted(run_dir.rglob("*")):
        name = str(path.relative_to(run_dir))
        if not path.is_file() or name in SKIP:
            continue
        if name == "metrics.json":
            metrics = json.loads(path.read_text())
            found[name] = {k: v for k, v in metrics.items() if not k.startswith("timing")}
        else:
            found[name] = path.read_bytes()
    return found


def test_a_failing_run_is_one_line_and_the_others_finish(
    first: tuple[Path, SweepResult, list[str]],
) -> None:
    out, result, lines = first
    failing = "harmful_train-no-such-prompts.json"
    assert result.finished == RUNS and list(result.failed) == [failing]
    assert "no-such-prompts.json" in result.failed[failing]
    assert "\n" not in result.failed[failing]
    reported = [line for line in lines if line.startswith("failed:")]
    assert reported == [
        f"failed: {failing}: {result.failed[failing]} (log: {log_path(out, failing)})"
    ]
    assert sum(line.startswith(f"retrying: {failing}") for line in lines) == 1
    log = log_path(out, failing).read_text()
    assert log.count("=== attempt") == 2 and "RefdirError" in log  # one retry, its traceback
    assert lines[-1].endswith("0 waiting, 1 failed") and "2 done" in lines[-1]
    for name in RUNS:
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["harmful"]["refusal_score"]["baseline"] >= 0.0
        assert (out / name / "report.html").is_file()
    assert not (out / failing).exists()  # failed before any step: nothing left behind
    assert result.comparison == out / "comparison" / "comparison.html"
    with (out / "comparison" / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == RUNS


def test_the_comparison_measures_how_stable_the_direction_is(
    first: tuple[Path, SweepResult, list[str]],
) -> None:
    out, _, _ = first
    text = (out / "comparison" / "comparison.md").read_text()
    section = text[text.index("## Stability of the chosen direction") :]
    assert "2 runs of" in section and "differ only in seed and n\\_train" in section
    picks = [json.loads((out / n / "direction.json").read_text()) for n in RUNS]
    for name, pick in zip(RUNS, picks, strict=True):
        assert f"| {name} | {name[-1]} | 6 | {pick['position']}, {pick['layer']} |" in section
    assert "| cosine | seed-1 | seed-2 |" in section
    assert "| seed-1 | 1.000 |" in section  # a direction against itself
    # each direction ablated on each run's held-out prompts: a baseline row, then one per run
    assert "| none (baseline) |" in section
    assert section.count("| seed-2 |") >= 3  # cosine, refusal metric and KL rows
    assert "| KL, harmless |" in section and "| harmful refusal, ablation |" in section


def test_running_again_redoes_nothing_finished(
    first: tuple[Path, SweepResult, list[str]], spec_dir: Path
) -> None:
    out, _, _ = first
    before = {
        p: p.stat().st_mtime_ns for name in RUNS for p in (out / name).rglob("*") if p.is_file()
    }
    lines: list[str] = []
    again = run_sweep(read_spec(spec_dir / "three.toml"), out, retries=0, echo=lines.append)
    assert again.skipped == RUNS and again.finished == RUNS
    assert list(again.failed) == ["harmful_train-no-such-prompts.json"]
    assert lines[0].startswith("sweep: 3 runs (2 finished before)")
    after = {
        p: p.stat().st_mtime_ns for name in RUNS for p in (out / name).rglob("*") if p.is_file()
    }
    assert after == before


def _wait_free(run_dir: Path, seconds: float = 60.0) -> None:
    """Until no process of the killed sweep holds the run folder's lock (Ray ends a dead
    driver's tasks within seconds). A run stopped before its first step ends removes the folder
    it made, lock and all: then nobody holds it either."""
    lock = run_dir / ".refdir-run.lock"
    if not lock.exists():
        return
    try:
        with filelock.FileLock(lock, timeout=seconds):
            pass
    except FileNotFoundError:
        assert not run_dir.exists()


def test_a_killed_sweep_started_again_ends_as_an_uninterrupted_one(
    first: tuple[Path, SweepResult, list[str]], local_ray: str, spec_dir: Path, tmp_path: Path
) -> None:
    reference, _, _ = first
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-c",
        "from refdir.cli import entry; entry()",
        "sweep",
        str(spec_dir / "two.toml"),
        "--out",
        str(out),
        "--address",
        local_ray,
        "--cpus-per-run",
        "2",  # one run at a time
    ]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / RUNS[0] / "refdir-run.json").exists():  # the first run has begun
        assert driver.poll() is None, driver.stdout.read() if driver.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (out / RUNS[1]).exists() and not (out / "comparison").exists()
    _wait_free(out / RUNS[0])
    result = run_sweep(read_spec(spec_dir / "two.toml"), out, echo=lambda line: None)
    assert result.finished == RUNS and not result.failed
    for name in RUNS:
        assert _artifacts(out / name) == _artifacts(reference / name)


def test_bad_specs_are_refused_in_one_line(tmp_path: Path) -> None:
    cases = {
        "[base]\nn_trian = 3\n": "unknown option 'n_trian' in [base]",
        "[[grid]]\nseed = []\n": "`seed` has no values",
        "[[grid]]\nn_train = [0]\n": "run n_train-0: `n_train`",
        "[grid]\nseed = 1\n": "give each grid as a [[grid]] table",
        "[sweep]\nretries = -1\n": "retries must be a whole number",
        "[runs]\n": "unknown table 'runs'",
        "[[grid]]\nmodel = ['a/x', 'b/x']\n": "both named 'model-x'",
    }
    for text, message in cases.items():
        (tmp_path / "spec.toml").write_text(text)
        with pytest.raises(RefdirError, match=message.replace("[", r"\[").replace("(", r"\(")):
            read_spec(tmp_path / "spec.toml")
    bad = runner.invoke(app, ["sweep", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "does not exist" in bad.output


def test_any_runconfig_field_can_be_a_grid_axis(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").write_text(
        '[base]\nseed = 3\n[[grid]]\nkl_max = [0.1, 0.2]\nharmful_eval = [["harmful_test"]]\n'
        "[[grid]]\nseed = [3]\n"
    )
    spec = read_spec(tmp_path / "spec.toml")
    names = [r.name for r in spec.runs]
    assert names == [
        "kl_max-0.1_harmful_eval-harmful_test",
        "kl_max-0.2_harmful_eval-harmful_test",
        "seed-3",
    ]
    assert spec.runs[1].config.kl_max == 0.2 and spec.runs[2].config.seed == 3


def test_compare_leaves_out_the_cross_evaluation_when_asked(
    first: tuple[Path, SweepResult, list[str]], tmp_path: Path
) -> None:
    out, _, _ = first
    args = ["compare", *(str(out / n) for n in RUNS), "--out", str(tmp_path / "c")]
    result = runner.invoke(app, [*args, "--no-cross-eval", "--labels", ",".join(RUNS)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "c" / "comparison.md").read_text()
    assert "| cosine | seed-1 | seed-2 |" in text
    assert "Each direction on the others' prompts: not measured." in text
    assert "none (baseline)" not in text
