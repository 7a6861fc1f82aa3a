"""The refusal direction as a monitor: the separation measures against scikit-learn, the
activations cut at a layer, the scorer, the study with its probe, `refdir monitor` and the
monitor step of `refdir run --suffix`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from typer.testing import CliRunner

import refdir
from refdir.artifacts.monitor import MonitorRecord
from refdir.cli import app
from refdir.data import sample_prompts
from refdir.directions.direction import Direction
from refdir.directions.extraction import extract_candidates, post_instruction_rows, residual_rows
from refdir.errors import RefdirError
from refdir.evaluation.monitor import monitor
from refdir.evaluation.monitor_study import PromptPair, choose_place, monitor_study
from refdir.evaluation.roc import auroc, roc_points, separation, tpr_at_fpr
from refdir.model.chat_model import ChatModel
from refdir.report.blocks import Image, Table
from refdir.report.monitor_section import LAYERS_PNG, ROC_PNG, monitor_section
from tiny import tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_tpr_at_1pct_fpr_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(1.0, 1.0, 150), 1)  # rounded: ties between the classes
    neg = np.round(rng.normal(0.0, 1.0, 200), 1)
    y = np.r_[np.ones(150), np.zeros(200)]
    s = np.r_[pos, neg]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, s))
    fpr, tpr, _ = roc_curve(y, s)
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(tpr[fpr <= 0.01].max())
    points = roc_points(pos, neg)
    assert points[0][0] == 0.0 and points[0][-1] == 1.0 and points[1][-1] == 1.0


def test_separation_intervals_hold_the_point_and_perfect_scores_are_one() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, 80), rng.normal(0.0, 1.0, 80)
    sep = separation(pos, neg, n_bootstrap=300, seed=1)
    assert sep.auroc_ci[0] < sep.auroc < sep.auroc_ci[1]
    assert sep.tpr_ci[0] <= sep.tpr <= sep.tpr_ci[1]
    assert sep == separation(pos, neg, n_bootstrap=300, seed=1)  # seeded
    perfect = separation(pos + 100, neg, n_bootstrap=50)
    assert perfect.auroc == perfect.tpr == 1.0 and perfect.auroc_ci == (1.0, 1.0)
    assert auroc(neg, pos + 100) == 0.0
    with pytest.raises(RefdirError, match="not all finite"):
        auroc([np.nan], [0.0])


def test_activations_cut_at_a_layer_equal_the_full_pass(cm: ChatModel) -> None:
    prompts = sample_prompts("harmful_train", 5, 0)
    full = post_instruction_rows(cm, prompts, progress=False)  # [N, P, L+1, d]
    assert full.shape == (5, cm.chat.n_post, cm.n_layers + 1, cm.d_model)
    cut = post_instruction_rows(cm, prompts, [1], [-1, -3], progress=False)
    torch.testing.assert_close(cut[:, :, 0], full[:, [-1, -3], 1])
    torch.testing.assert_close(residual_rows(cm, prompts, -2, progress=False), full[:, -2])
    attacked = post_instruction_rows(cm, prompts, [2], [-1], " !!zq", progress=False)
    assert not torch.allclose(attacked[:, 0, 0], full[:, -1, 2])
    with pytest.raises(RefdirError, match="layer 9 is outside"):
        post_instruction_rows(cm, prompts, [9], progress=False)


def _direction(cm: ChatModel, layer: int = 2) -> tuple[Direction, list[str], list[str]]:
    harmful = sample_prompts("harmful_train", 24, 0)
    harmless = sample_prompts("harmless_train", 24, 0)
    cands = extract_candidates(cm, harmful, harmless, progress=False)
    return cands.direction(-1, layer), harmful, harmless


def test_the_scorer_is_the_projection_and_separates_its_training_prompts(cm: ChatModel) -> None:
    direction, harmful, harmless = _direction(cm)
    scorer = refdir.monitor(cm, direction)
    assert (scorer.layer, scorer.position) == (2, -1)
    rows = residual_rows(cm, harmful, -1, progress=False)[:, 2]
    np.testing.assert_allclose(scorer(harmful), (rows @ direction.unit().double()).numpy())
    # the direction is these prompts' difference of means: their mean scores differ by its norm
    gap = scorer(harmful).mean() - scorer(harmless).mean()
    assert gap == pytest.approx(direction.norm, rel=1e-4)
    assert auroc(scorer(harmful), scorer(harmless)) > 0.6
    with pytest.raises(RefdirError, match="`layer` 7 is outside"):
        monitor(cm, direction, layer=7)
    with pytest.raises(RefdirError, match="not a post-instruction position"):
        monitor(cm, direction, position=0)


def test_the_study_measures_both_scorers_in_every_condition(cm: ChatModel) -> None:
    direction, harmful, harmless = _direction(cm)
    train = PromptPair(harmful, harmless)
    test = PromptPair(sample_prompts("harmful_test", 12, 0), sample_prompts("harmless_test", 12, 0))
    val = PromptPair(sample_prompts("harmful_val", 8, 0), sample_prompts("harmless_val", 8, 0))
    suffixes = {"adversarial": " zq!! zq", "random": " abc"}
    record = monitor_study(
        cm, direction, train, test, val=val, suffixes=suffixes, n_bootstrap=100, progress=False
    )
    assert record.chosen_by == "validation"
    assert (record.layer, record.position) == choose_place(cm, direction, val)
    assert [(c.scorer, c.condition) for c in record.table] == [
        (s, c) for s in ("direction", "probe") for c in ("plain", "adversarial", "random")
    ]
    for cell in record.table:
        curve = record.curve(cell.scorer, cell.condition)
        assert len(curve.auroc) == cm.n_layers + 1
        assert curve.auroc[record.layer] == pytest.approx(cell.auroc)
        assert cell.auroc_low <= cell.auroc <= cell.auroc_high
    # the probe, trained on the training prompts, separates them: scored on them it is near 1
    on_train = monitor_study(
        cm, direction, train, train, layer=2, position=-1, n_bootstrap=0, progress=False
    )
    assert on_train.chosen_by == "given" and on_train.cell("probe", "plain").auroc > 0.9
    plain_scores = monitor(cm, direction, record.layer, record.position)
    expected = auroc(plain_scores(test.harmful), plain_scores(test.harmless))
    assert record.cell("direction", "plain").auroc == pytest.approx(expected)
    attacked = auroc(
        plain_scores(test.harmful, suffixes["adversarial"]), plain_scores(test.harmless)
    )
    assert record.cell("direction", "adversarial").auroc == pytest.approx(attacked)
    blocks = monitor_section(record)
    table = next(b for b in blocks if isinstance(b, Table))
    assert len(table.rows) == 6 and table.rows[0][:2] == ["direction", "harmful alone"]
    images = [b for b in blocks if isinstance(b, Image)]
    assert [i.name for i in images] == [f"suffix_{ROC_PNG}", f"suffix_{LAYERS_PNG}"]
    assert all(i.png.startswith(b"\x89PNG") for i in images)


def test_cli_monitor_prints_one_json_line_and_writes_its_files(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    tiny_model("qwen2").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    Direction(torch.randn(32), 2, -1, "tiny").save(tmp_path / "direction")
    out = tmp_path / "out"
    args = ["monitor", "--model", str(model_dir), "--direction", str(tmp_path / "direction")]
    args += ["--n", "6", "--n-train", "6", "--n-val", "4", "--bootstrap", "20", "--json"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert {"auroc", "tpr_at_1pct_fpr", "layer", "position", "n_harmful", "n_harmless"} <= set(data)
    assert (data["n_harmful"], data["n_harmless"], data["n_train_harmful"]) == (6, 6, 6)
    assert data["chosen_by"] == "validation" and 0.0 <= data["auroc"] <= 1.0
    record = MonitorRecord.read(out)
    assert record.conditions == ["plain", "random"]  # no --suffix: no adversarial condition
    assert record.cell("direction", "plain").auroc == data["auroc"]
    for name in (ROC_PNG, LAYERS_PNG):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    given = runner.invoke(app, [*args, "--layer", "1", "--position", "-2", "--no-random-suffix"])
    assert given.exit_code == 0, given.output
    data = json.loads(given.stdout)
    assert (data["layer"], data["position"], data["chosen_by"]) == (1, -2, "given")
    bad = runner.invoke(app, [*args, "--layer", "9"])
    assert bad.exit_code == 2 and "outside 0..3" in bad.stderr and "Traceback" not in bad.stderr
    missing = runner.invoke(app, [*args, "--suffix", str(tmp_path)])
    assert missing.exit_code == 2 and "holds no suffix.json" in missing.stderr


def test_the_run_measures_the_monitor_under_its_suffix(finished_run: Path) -> None:
    record = MonitorRecord.read(finished_run / "suffix")
    found = json.loads((finished_run / "suffix" / "suffix.json").read_text())
    assert record.suffixes == {
        "plain": "",
        "adversarial": found["suffix"],
        "random": found["random_suffix"],
    }
    assert record.chosen_by == "validation"
    assert not set(found["instructions"]) & set(record.suffixes)
    md = (finished_run / "report.md").read_text()
    assert "The direction as a monitor" in md and f"figures/suffix_{ROC_PNG}" in md
    assert (finished_run / "figures" / f"suffix_{LAYERS_PNG}").is_file()


def test_a_run_folder_without_the_monitor_gets_it_and_its_report_again(run_copy: Path) -> None:
    """A folder written before the monitor step existed: a resumption runs the step, then the
    report that reads it, and nothing else."""
    from refdir.artifacts.run import ConfigRecord
    from refdir.study.config import RunConfig
    from refdir.study.run import run_pipeline
    from tiny import tiny_chat_model

    (run_copy / "suffix" / MonitorRecord.FILE).unlink()
    md = run_copy / "report.md"
    md.write_text(md.read_text().replace("The direction as a monitor", "(old report)"))
    config = RunConfig(**ConfigRecord.read(run_copy).run)
    done = run_pipeline(config, run_copy, progress=False, model=tiny_chat_model("llama"))
    assert sorted(done) == ["monitor", "report"]
    assert "The direction as a monitor" in md.read_text()
