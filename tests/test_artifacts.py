"""The typed files: the published schemas are current, files of refdir 0.1.0 still load (a
run folder of 0.1.0 is kept in tests/data), the step table is complete, and the library's
errors speak Python."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest

import refdir
import refdir.cli
from refdir.artifacts.base import Artifact
from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.run import ConfigRecord, TimingsRecord
from refdir.artifacts.schemas import ARTIFACTS, schema_texts
from refdir.artifacts.selection import SelectionRecord
from refdir.errors import RefdirError
from refdir.report.compare import write_comparison
from refdir.study.config import RunConfig
from refdir.study.files import RUN_FILES
from refdir.study.plan import (
    RESULT_FREE,
    STEP_NAMES,
    STEPS,
    changed_options,
    every_option_is_read,
)

ROOT = Path(__file__).parent.parent
OLD_RUN = Path(__file__).parent / "data" / "run-0.1.0"
SUFFIX_FILES = {"suffix.json", "history.json", "analysis.json"}


def test_the_published_schemas_are_current() -> None:
    published = ROOT / "docs" / "schemas"
    texts = schema_texts()
    assert sorted(p.name for p in published.glob("*.json")) == sorted(texts)
    for name, text in texts.items():
        assert (published / name).read_text() == text, (
            f"docs/schemas/{name} is stale: python -m refdir.artifacts.schemas docs/schemas"
        )


# 0.1.0 wrote no benchmarks in that run, no marker (0.2.0 adds it), and had no optimize,
# monitor or compare-directions
@pytest.mark.parametrize(
    "artifact",
    [
        a
        for a in ARTIFACTS
        if a.FILE
        not in (
            "benchmarks.json",
            "refdir-run.json",
            "pareto.json",
            "heldout.json",
            "monitor.json",
            "directions.json",
        )
    ],
)
def test_files_of_refdir_0_1_0_load_and_write_back_the_same(artifact: type[Artifact]) -> None:
    folder = OLD_RUN / "suffix" if artifact.FILE in SUFFIX_FILES else OLD_RUN
    record = artifact.read(folder)
    assert json.loads(record.text()) == json.loads((folder / artifact.FILE).read_text())


def test_a_run_folder_of_0_1_0_compares_and_resumes(tmp_path: Path) -> None:
    html, _, csv = write_comparison([OLD_RUN], tmp_path / "cmp")
    assert "organism" in html.read_text() and "0.980" in csv.read_text()
    config = RunConfig(**ConfigRecord.read(OLD_RUN).run)
    assert changed_options(config, OLD_RUN) == set()  # the same options: the run resumes
    assert changed_options(config.model_copy(update={"n_ce": 3}), OLD_RUN) == {"n_ce"}


def test_a_file_of_another_format_is_refused_in_one_line_naming_the_versions(
    tmp_path: Path,
) -> None:
    shutil.copy(OLD_RUN / "metrics.json", tmp_path)
    data = json.loads((tmp_path / "metrics.json").read_text())
    data["harmful"]["refusal_rate"] = data["harmful"].pop("refusal_score")  # a renamed key
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(RefdirError) as info:
        MetricsRecord.read(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "refdir 0.2.0 or 0.1.0" in message
    assert "harmful.refusal_score: Field required" in message and "`force='evaluate'`" in message


def test_damaged_timings_keep_their_good_entries(tmp_path: Path) -> None:
    (tmp_path / "timings.json").write_text(
        json.dumps(
            {
                "prompts": 1.5,
                "select": "slow",
                "parts": {"select": {"induce": 2.0}, "evaluate": {"ce": "x"}},
                "devices": {"select": "cpu", "evaluate": 3},
                "stray": 1,
            }
        )
    )
    record = TimingsRecord.read_lenient(tmp_path)
    assert record.steps() == {"prompts": 1.5}
    assert record.parts == {"select": {"induce": 2.0}} and record.devices == {"select": "cpu"}
    (tmp_path / "timings.json").write_text("[")
    assert TimingsRecord.read_lenient(tmp_path) == TimingsRecord()


def test_every_option_of_a_run_is_read_by_a_step_and_every_file_has_its_step() -> None:
    assert every_option_is_read() == set()
    # and every option a step names is one, and none is both read and result-free
    read = {o for step in STEPS for r in step.reads for o in r.options}
    assert read <= set(RunConfig.model_fields) and set(RunConfig.model_fields) >= RESULT_FREE
    assert not read & RESULT_FREE
    assert {f.STEP for f in RUN_FILES} <= set(STEP_NAMES)
    assert {a.STEP for a in ARTIFACTS if a.STEP} <= set(STEP_NAMES)
    steps = [f for f in TimingsRecord.model_fields if f not in ("parts", "devices")]
    assert steps == list(STEP_NAMES)  # timings.json has a key per step, in the steps' order
    for step in STEPS:  # a step reads the files of earlier steps only
        assert all(STEP_NAMES.index(n) < STEP_NAMES.index(step.name) for n in step.needs)
    assert SelectionRecord.FILE in STEPS[STEP_NAMES.index("select")].writes


def _error_texts(path: Path) -> list[tuple[int, str]]:
    """The literal text of every ``RefdirError(...)`` raised or built in a module."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RefdirError":
            text = "".join(
                part.value
                for arg in node.args
                for part in ast.walk(arg)
                if isinstance(part, ast.Constant) and isinstance(part.value, str)
            )
            found.append((node.lineno, text))
    return found


def test_the_library_s_errors_speak_python_and_the_command_line_s_speak_flags() -> None:
    package = Path(refdir.__file__).parent
    flags = re.compile(r"(?<![\w-])--[a-z][a-z-]*")

    def speaks_flags(text: str) -> bool:
        return bool(flags.search(re.sub(r"`[^`]*`", "", text)))  # a quoted command may have flags

    library = [
        p for p in sorted(package.rglob("*.py")) if "cli" not in p.relative_to(package).parts
    ]
    errors = {
        f"{path.relative_to(package)}:{line}": text
        for path in library
        for line, text in _error_texts(path)
    }
    assert len(errors) > 100  # the scan finds the library's errors, in every stage
    assert {key.split("/")[0] for key in errors} >= {
        "directions",
        "interventions",
        "model",
        "study",
    }
    assert not [f"{where}: {text}" for where, text in errors.items() if speaks_flags(text)]
    # the scan does flag a flag, and the command line's own errors do speak flags
    assert speaks_flags("give --layer") and not speaks_flags("run `refdir run --layer 1`")
    command_line = [
        text for path in sorted((package / "cli").rglob("*.py")) for _, text in _error_texts(path)
    ]
    assert any(speaks_flags(text) for text in command_line)
    from refdir.cli.options import flags_in  # the package builds the commands and their flags

    message = "give `refusal_tokens`, or `filter_prompts=False`; then `force='select'`"
    assert flags_in(message) == "give --refusal-tokens, or --no-filter; then --force select"
    assert flags_in("`LayoutSpec(layers=...)` and `nothing`") == (
        "`LayoutSpec(layers=...)` and `nothing`"
    )


def test_a_record_that_would_not_read_back_is_not_written(tmp_path: Path) -> None:
    """JSON has no NaN: written as null, a number field would refuse it on reading."""
    from refdir.artifacts.suffix import SuffixHistory

    with pytest.raises(RefdirError, match=r"history.json would not read back \(loss.1 is nan"):
        SuffixHistory(loss=[1.0, float("nan")], best=[1.0, 1.0]).write(tmp_path)
    assert list(tmp_path.iterdir()) == []
    SuffixHistory(loss=[1.0, 0.5], best=[1.0, 0.5]).write(tmp_path)
    assert SuffixHistory.read(tmp_path).loss == [1.0, 0.5]
