"""`refdir compare-directions`: two models' refusal directions compared, on tiny models saved
as folders and extracted by `refdir extract` (the organism against its base: docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from refdir.artifacts.comparison import DirectionComparison
from refdir.cli import app
from refdir.data import sample_prompts
from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.compare_directions import (
    cross_rates,
    layer_cosines,
    projections,
    read_source,
    vector_cosine,
)
from refdir.evaluation.refusal import evaluate_refusal
from refdir.interventions.intervention import Intervention
from refdir.model.chat_model import ChatModel
from tiny import tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny qwen2 models of the same width (seeds 0 and 1), each with `refdir extract`."""
    root = tmp_path_factory.mktemp("two")
    folders = {}
    for seed in (0, 1):
        model_dir = root / f"model{seed}"
        tiny_model("qwen2", seed=seed).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        out = root / f"extract{seed}"
        args = ["extract", "--model", str(model_dir), "--out", str(out), "--n-train", "6"]
        result = runner.invoke(app, [*args, "--layer", "2"])
        assert result.exit_code == 0, result.output
        folders[f"model{seed}"], folders[f"extract{seed}"] = model_dir, out
    return folders


def test_a_direction_against_itself_is_the_same_in_every_measure(cm: ChatModel) -> None:
    harmful = sample_prompts("harmful_test", 4, 0)
    harmless = sample_prompts("harmless_test", 4, 0)
    cands_h = sample_prompts("harmful_train", 8, 0)
    cands_l = sample_prompts("harmless_train", 8, 0)
    from refdir.directions.extraction import extract_candidates

    cands = extract_candidates(cm, cands_h, cands_l, progress=False)
    own = cands.direction(-1, 2)
    same = layer_cosines(cands, cands, -1)
    assert same[0] is None, "the last token's embedding is the same for every prompt"
    assert same[1:] == pytest.approx([1.0] * cm.n_layers)
    p = projections(cm, own, own, harmful, harmless, progress=False)
    assert p.harmful_other == p.harmful_own and len(p.harmful_own) == cm.n_layers + 1
    rates = cross_rates(cm, own, own, harmful, harmless, 3, progress=False)
    assert rates.harmful_ablate_other == rates.harmful_ablate_own
    assert rates.harmless_add_other == rates.harmless_add_own
    # the rates are those of one evaluation per condition
    alone = evaluate_refusal(cm, harmful, "h", Intervention.ablation(own), 3, progress=False)
    assert rates.harmful_ablate_own == alone.refusal_rate
    # the harmful prompts lie further along the direction than the harmless ones at its layer
    other = Direction(-own.vector, 2, -1, "flipped")
    flipped = projections(cm, own, other, harmful, harmless, progress=False)
    assert flipped.harmful_other == pytest.approx([-v for v in flipped.harmful_own])


def test_cli_compares_two_models_directions(extracted: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare-directions", str(extracted["extract0"]), str(extracted["extract1"])]
    args += ["--labels", "zero,one", "--n", "3", "--max-new-tokens", "2", "--out", str(out)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    record = DirectionComparison.read(out)
    assert record.dump() == data
    a, b = read_source(extracted["extract0"]), read_source(extracted["extract1"])
    assert record.cosine == pytest.approx(vector_cosine(a.direction.vector, b.direction.vector))
    assert a.candidates is not None and b.candidates is not None
    assert record.cosine_by_layer == pytest.approx(layer_cosines(a.candidates, b.candidates, -1))
    assert (record.a.label, record.b.label) == ("zero", "one")
    assert record.a.model == str(extracted["model0"])  # the model its direction records
    assert record.a.rates is not None and record.b.projections is not None
    assert len(record.b.projections.harmless_other) == 4
    assert (record.n_harmful, record.n_harmless) == (3, 3)
    assert (out / "directions.png").read_bytes().startswith(b"\x89PNG")
    text = runner.invoke(app, [*args[:3], "--no-measure"])
    assert text.exit_code == 0 and "cosine per layer (position -1)" in text.stdout


def test_cli_compare_directions_bad_input_is_one_line(
    extracted: dict[str, Path], tmp_path: Path
) -> None:
    Direction(torch.randn(16), 2, -1, "narrow").save(tmp_path / "narrow")
    args = ["compare-directions", str(extracted["extract0"]), str(tmp_path / "narrow")]
    result = runner.invoke(app, [*args, "--no-measure"])
    assert result.exit_code == 2 and "same width" in result.stderr
    missing = runner.invoke(app, ["compare-directions", str(tmp_path), str(tmp_path / "narrow")])
    assert missing.exit_code == 2 and "holds no direction.safetensors" in missing.stderr
    with pytest.raises(RefdirError, match="same layers"):
        small = Candidates(torch.zeros(2, 3, 4), torch.ones(2, 3, 4), "x")
        layer_cosines(small, Candidates(torch.zeros(2, 4, 4), torch.ones(2, 4, 4), "y"), -1)
    bad = runner.invoke(app, [*args, "--device", "tpu"])
    assert bad.exit_code == 2 and "--device" in bad.stderr
