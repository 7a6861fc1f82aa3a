from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.run import ConfigRecord
from refdir.artifacts.selection import SelectionRecord
from refdir.cli import app
from refdir.errors import RefdirError
from refdir.report.compare import RunSummary, _csv_text, write_comparison
from refdir.study.run import run_pipeline
from test_pipeline import CONFIG
from tiny import tiny_chat_model, tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two finished runs of different tiny models, with the same settings."""
    out = []
    for arch in ("llama", "qwen2"):
        run_dir = tmp_path_factory.mktemp(arch)
        run_pipeline(CONFIG, run_dir, progress=False, model=tiny_chat_model(arch))
        out.append(run_dir)
    return out


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_comparison_shows_every_run(runs: list[Path], tmp_path: Path) -> None:
    html_path, md_path, csv_path = write_comparison(runs, tmp_path / "cmp", ["llama", "qwen2"])
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["label"] for r in rows] == ["llama", "qwen2"]
    md = md_path.read_text()
    for run_dir, row in zip(runs, rows, strict=True):
        metrics = _metrics(run_dir)
        selection = json.loads((run_dir / "selection.json").read_text())
        assert int(row["layer"]) == metrics["direction"]["layer"]
        assert int(row["n_layers"]) == len(selection["layers"]) == 3
        assert float(row["layer_fraction"]) == pytest.approx(metrics["direction"]["layer"] / 3)
        for c in ("baseline", "ablation", "actadd"):
            assert float(row[f"harmful_refusal_{c}"]) == metrics["harmful"]["refusal_score"][c]
            assert float(row[f"ce_text_{c}"]) == metrics["ce_loss"][c]
        assert float(row["kl_ablation"]) == metrics["harmless"]["kl_ablation"]
        assert row["harmful_safety_baseline"] == "" and row["kl_random_median"] == ""
        harmful = metrics["harmful"]["refusal_score"]
        arrow = " → ".join(f"{harmful[c]:.3f}" for c in ("baseline", "ablation", "actadd"))
        assert f"| {row['label']} | {arrow} |" in md
    assert "Every run used the same settings" in md
    picked = [json.loads((d / "selection.json").read_text())["rule"] for d in runs]
    assert [r["picked_by"] for r in rows] == [
        "fallback" if "fallback" in rule else "filter" for rule in picked
    ]
    assert "## Chosen directions" in md and "figures/comparison_refusal.png" in md
    assert (tmp_path / "cmp" / "figures" / "comparison_refusal.png").stat().st_size > 1000
    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == 1 and 'src="http' not in page
    assert "harmful safety" not in md  # no judge, no safety column
    # the run time of each step, as each run recorded it
    steps = ["prompts", "extract", "select", "evaluate", "report"]
    assert f"| run | device | {' | '.join(steps)} | total |" in md
    for run_dir, row in zip(runs, rows, strict=True):
        timings = _metrics(run_dir)["timings"]
        assert list(timings) == steps
        for step in steps:
            assert float(row[f"seconds_{step}"]) == timings[step]
        assert float(row["seconds_total"]) == pytest.approx(sum(timings.values()), abs=0.01)
        assert row["seconds_suffix"] == "" and row["device"] == "cpu"
    assert "| llama | cpu |" in md
    # a run made before steps recorded their device and parts: no device, times as recorded
    old_run = tmp_path / "old"
    shutil.copytree(runs[0], old_run)
    metrics = _metrics(old_run)
    del metrics["timing_devices"], metrics["timing_parts"]
    (old_run / "metrics.json").write_text(json.dumps(metrics))
    _, md_path, csv_path = write_comparison([old_run, runs[1]], tmp_path / "cmp2", ["old", "new"])
    old_row = next(csv.DictReader(csv_path.open()))
    assert (
        old_row["device"] == "" and float(old_row["seconds_select"]) == metrics["timings"]["select"]
    )
    assert "| old | — |" in md_path.read_text()


def test_a_judged_run_adds_the_safety_score(runs: list[Path], tmp_path: Path) -> None:
    judged = tmp_path / "judged"
    shutil.copytree(runs[1], judged)
    metrics = _metrics(judged)
    metrics["harmful"]["safety_score"] = {"baseline": 0.9, "ablation": 0.25, "actadd": 0.8}
    (judged / "metrics.json").write_text(json.dumps(metrics))
    _, md_path, csv_path = write_comparison([runs[0], judged], tmp_path / "cmp", ["a", "b"])
    md = md_path.read_text()
    assert "harmful safety: baseline → ablation → act. add" in md
    assert "| 0.900 → 0.250 → 0.800 |" in md and "| — → — → — |" in md  # run a was not judged
    rows = list(csv.DictReader(csv_path.open()))
    assert rows[1]["harmful_safety_ablation"] == "0.25" and rows[0]["harmful_safety_ablation"] == ""


def test_refusal_scores_are_compared_condition_by_condition(
    runs: list[Path], tmp_path: Path
) -> None:
    """The tiny runs refuse nothing (every score 0.0, which any column holds): a copy with a
    distinct score per condition shows each in its own column and in the summary's means."""
    refusing = tmp_path / "refusing"
    shutil.copytree(runs[1], refusing)
    metrics = _metrics(refusing)
    assert all(v == 0.0 for v in metrics["harmful"]["refusal_score"].values())
    metrics["harmful"]["refusal_score"] = {"baseline": 0.875, "ablation": 0.125, "actadd": 0.5}
    metrics["harmless"]["refusal_score"] = {"baseline": 0.25, "actadd": 0.75}
    (refusing / "metrics.json").write_text(json.dumps(metrics))
    _, md_path, csv_path = write_comparison([runs[0], refusing], tmp_path / "cmp", ["a", "b"])
    row = list(csv.DictReader(csv_path.open()))[1]
    assert [row[f"harmful_refusal_{c}"] for c in ("baseline", "ablation", "actadd")] == [
        "0.875",
        "0.125",
        "0.5",
    ]
    assert [row[f"harmless_refusal_{c}"] for c in ("baseline", "actadd")] == ["0.25", "0.75"]
    md = md_path.read_text()
    assert "| b | 0.875 → 0.125 → 0.500 | 0.250 → 0.750 |" in md
    assert "| a | 0.000 → 0.000 → 0.000 | 0.000 → 0.000 |" in md
    summary = md.split("\n\n")[1]  # the means over both runs
    assert re.findall(r"\b\d\.\d{3}\b", summary) == ["0.438", "0.062", "0.125", "0.375"]


def test_settings_that_differ_are_flagged(runs: list[Path], tmp_path: Path) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(runs[0], changed)
    config = json.loads((changed / "config.json").read_text())
    config["options"]["max_new_tokens"] = 99
    (changed / "config.json").write_text(json.dumps(config))
    _, md_path, csv_path = write_comparison([runs[0], changed], tmp_path / "cmp")
    md = md_path.read_text()
    assert "differ in more than the model (max\\_new\\_tokens)" in md
    assert "| run | max\\_new\\_tokens |" in md and "| 99 |" in md
    # both runs are of the model "tiny": the folder tells them apart
    labels = [r["label"] for r in csv.DictReader(csv_path.open())]
    assert labels == [f"tiny ({runs[0].name})", "tiny (changed)"]


BAD_INPUT = {
    "unfinished run": (
        lambda runs, tmp: [runs[0], tmp / "unfinished"],
        None,
        "has no metrics.json: not a finished run",
    ),
    "run given twice": (lambda runs, tmp: [runs[0], runs[0]], None, "run folder given twice"),
    "not a run": (lambda runs, tmp: [runs[0], tmp / "nowhere"], None, "is not a run folder"),
    "too few labels": (lambda runs, tmp: runs, ["one"], "1 labels for 2 runs"),
    "label twice": (lambda runs, tmp: runs, ["same", "same"], "label 'same' given twice"),
    "no runs": (lambda runs, tmp: [], None, "give at least one run folder"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(
    runs: list[Path], tmp_path: Path, case: str
) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs[0], unfinished)
    (unfinished / "metrics.json").unlink()
    dirs, labels, message = BAD_INPUT[case]
    out = tmp_path / "cmp"
    with pytest.raises(RefdirError, match=message) as err:
        write_comparison(dirs(runs, tmp_path), out, labels)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_an_output_that_cannot_be_a_folder_is_refused(runs: list[Path], tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(RefdirError, match="exists and is not a folder"):
        write_comparison(runs, a_file)
    with pytest.raises(RefdirError, match=r"cannot create the folder .*a-file/x"):
        write_comparison(runs, a_file / "x")
    assert a_file.read_text() == "not a folder"


def test_compare_command(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", *map(str, runs), "--out", str(out), "--labels", "a, b"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "comparison.md" in result.output
    assert [r["label"] for r in csv.DictReader((out / "comparison.csv").open())] == ["a", "b"]
    bad = runner.invoke(app, ["compare", str(runs[0]), "--out", str(out), "--labels", "a,b"])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: 2 labels for 1 runs; give one label per run, in order"


def test_labels_that_a_spreadsheet_would_run_stay_text_in_the_csv(
    runs: list[Path], tmp_path: Path
) -> None:
    """OWASP's CSV injection: a text cell starting with =, +, -, @, a tab or a carriage return
    gets a leading ' ; numbers (a negative position) stay numbers."""
    labels = ["=cmd|' /C calc'!A0", "@SUM(1+1)"]
    _, _, csv_path = write_comparison(runs, tmp_path / "cmp", labels=labels)
    rows = list(csv.DictReader(csv_path.open(newline="")))
    assert [r["label"] for r in rows] == ["'=cmd|' /C calc'!A0", "'@SUM(1+1)"]
    assert all(re.fullmatch(r"-\d+", r["position"]) for r in rows)  # a number, not "'-3"
    formula = ("=", "+", "@", "\t", "\r")
    assert not any(v.startswith(formula) for r in rows for v in r.values())
    for text in ("+1", "-x", "\tx", "\rx", "=1", "@x", "a\rb"):
        text_csv = _csv_text([{"a": text, "b": -2.5, "c": -3}])
        (row,) = csv.DictReader(io.StringIO(text_csv, newline=""))
        cell = text if text == "a\rb" else "'" + text  # a line break inside: one row still
        assert row == {"a": cell, "b": "-2.5", "c": "-3"}


def test_labels_name_local_models_briefly(runs: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "models" / "my-chat-model"
    folder.mkdir(parents=True)
    copies = []
    for name, options in (
        ("folder", {"model": str(folder)}),
        ("gguf", {"model": str(folder), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}),
        ("hub", {"model": "org/some-chat-model"}),
    ):
        run_dir = tmp_path / name
        shutil.copytree(runs[0], run_dir)
        config = json.loads((run_dir / "config.json").read_text())
        config["options"].update(options)
        (run_dir / "config.json").write_text(json.dumps(config))
        metrics = _metrics(run_dir)
        metrics["model"] = options["model"]
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        copies.append(run_dir)
    _, _, csv_path = write_comparison(copies, tmp_path / "cmp")
    labels = [r["label"] for r in csv.DictReader(csv_path.open())]
    assert labels == ["my-chat-model", "SmolLM2-135M-Instruct.Q4_1", "org/some-chat-model"]


def test_benchmarks_are_compared_where_runs_have_them(runs: list[Path], tmp_path: Path) -> None:
    benched = tmp_path / "benched"
    shutil.copytree(runs[1], benched)
    scores = {"tiny_mc": {"acc": {"baseline": 0.5, "ablation": 0.25}}}
    record = {"tasks": ["t.yaml"], "limit": None, "scores": scores}
    (benched / "benchmarks.json").write_text(json.dumps(record))
    _, md_path, csv_path = write_comparison([runs[0], benched], tmp_path / "cmp", ["a", "b"])
    md = md_path.read_text()
    assert "## Benchmarks" in md and "| b | tiny\\_mc | acc | 0.500 | 0.250 (-0.250) |" in md
    assert "| a | tiny\\_mc" not in md  # run a has no benchmarks
    rows = list(csv.DictReader(csv_path.open()))
    assert rows[1]["benchmark:tiny_mc:acc:ablation"] == "0.25"
    assert rows[0]["benchmark:tiny_mc:acc:ablation"] == ""
    _, md_path, _ = write_comparison(runs, tmp_path / "plain")
    assert "## Benchmarks" not in md_path.read_text()


def test_a_hand_picked_direction_is_named_so(runs: list[Path], tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    shutil.copytree(runs[0], manual)
    selection = json.loads((manual / "selection.json").read_text())
    selection.update(rule="manual: --layer 1 --position -1", fallback=False)
    selection["chosen"].update(bypass=float("nan"), kl=None)  # unscored (NaN: an older run's)
    (manual / "selection.json").write_text(json.dumps(selection))
    _, md_path, csv_path = write_comparison([manual, runs[1]], tmp_path / "cmp", ["m", "auto"])
    assert next(csv.DictReader(csv_path.open()))["picked_by"] == "manual"
    md = md_path.read_text()
    assert "| m | " in md and "| manual | — / " in md and md.count(" / —") >= 1


def test_a_local_model_is_labelled_by_its_name_from_any_folder(tmp_path: Path) -> None:
    from refdir.artifacts.metrics import MetricsRecord
    from refdir.artifacts.selection import SelectionRecord
    from refdir.report.compare import RunSummary

    def label(model: str) -> str:
        metrics = MetricsRecord.model_construct(model=model)
        return RunSummary(
            "", tmp_path, metrics, SelectionRecord.model_construct(), {}, None
        ).short_name

    assert label("/gone/models/tiny-chat") == "tiny-chat"  # no longer there, or elsewhere
    assert label("./models/tiny-chat") == "tiny-chat"
    assert label("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert label("organism") == "organism"


def test_a_relative_local_model_with_one_slash_is_not_taken_for_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_model("llama").save_pretrained("models/tiny-chat")  # reads like "org/name"
    tiny_tokenizer().save_pretrained("models/tiny-chat")
    args = ["run", "--model", "models/tiny-chat", "--out", "run", "--until", "prompts"]
    result = CliRunner().invoke(app, [*args, "--refusal-tokens", "5,6", "--no-filter"])
    assert result.exit_code == 0, result.output
    assert json.loads(Path("run/config.json").read_text())["local_model"] is True
    monkeypatch.chdir(tmp_path / "models")  # compared from elsewhere: the path is gone
    summary = RunSummary(
        "",
        tmp_path / "run",
        MetricsRecord.model_construct(model="models/tiny-chat"),
        SelectionRecord.model_construct(),
        {},
        None,
        local=ConfigRecord.read(tmp_path / "run").local_model,
    )
    assert summary.short_name == "tiny-chat"
