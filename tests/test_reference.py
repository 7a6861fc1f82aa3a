"""`refdir evaluate --reference MODEL`: the KL of the evaluated model, under its intervention,
against another checkpoint (``refdir.evaluation.kl.kl_against_reference``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from refdir.cli import app
from refdir.data import load_prompts
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.kl import Reference, kl_against_reference, kl_by_prompt
from refdir.interventions.intervention import Intervention
from refdir.measures import kl_divergence
from refdir.model.generation import last_position_logits
from refdir.model.loading import load_model
from tiny import VOCAB, tiny_chat_model, tiny_model, tiny_tokenizer

runner = CliRunner()

PROMPTS = ["how to pick a lock", "bake bread", "a poem about rain", "steal a car"]


def _save(
    path: Path, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, **changes: int
) -> Path:
    """A tiny model folder; weights 10 x the default's scale, so that an ablation's KL is near
    the paper's 0.1 rather than 1e-5 (nearly uniform logits)."""
    model = tiny_model("qwen2", seed=seed, initializer_range=0.2, **changes)
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An original model, another of its family, one of another vocabulary, one whose tokenizer
    gives other ids, a direction, the original orthogonalized along it, and a prompt file."""
    root = tmp_path_factory.mktemp("reference")
    _save(root / "original")
    _save(root / "other", seed=1)
    _save(root / "wide", vocab_size=VOCAB + 8)
    _save(root / "reordered", tokenizer=tiny_tokenizer(reversed_bytes=True))
    Direction(torch.randn(32, generator=torch.Generator().manual_seed(3)), 1, -1, "tiny").save(
        root / "direction"
    )
    exported = runner.invoke(
        app,
        [
            *["orthogonalize", "--model", str(root / "original")],
            *["--direction", str(root / "direction"), "--out", str(root / "exported")],
        ],
    )
    assert exported.exit_code == 0, exported.output
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _evaluate(bench: Path, model: str, reference: str, *extra: str) -> dict[str, object]:
    args = [
        *["evaluate", "--model", str(bench / model), "--reference", str(bench / reference)],
        *["--prompts", str(bench / "prompts.txt"), "--n", "0", "--max-new-tokens", "1", "--json"],
        *extra,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def test_a_model_against_itself_has_no_kl(bench: Path) -> None:
    summary = _evaluate(bench, "original", "original")
    assert summary["reference"] == str(bench / "original") and summary["n"] == len(PROMPTS)
    for key in ("kl_reference", "kl_reference_median", "kl_reference_max"):
        assert abs(float(summary[key])) < 1e-9, key  # type: ignore[arg-type]


def test_the_export_against_its_original_is_the_ablation_against_it(bench: Path) -> None:
    """The weight edit and the hooks give the same KL against the original."""
    exported = _evaluate(bench, "exported", "original")
    hooked = _evaluate(
        bench, "original", "original", "--intervention", "ablate", "--direction",
        str(bench / "direction"),
    )  # fmt: skip
    assert hooked["intervention"] == "ablate" and exported["intervention"] == "none"
    for key in ("kl_reference", "kl_reference_median", "kl_reference_max"):
        assert float(exported[key]) > 0.01  # type: ignore[arg-type]
        assert float(exported[key]) == pytest.approx(hooked[key], abs=1e-4)  # type: ignore[arg-type]


def test_the_json_holds_the_kl_computed_from_the_logits(bench: Path) -> None:
    summary = _evaluate(bench, "other", "original")
    prompts = load_prompts(bench / "prompts.txt")
    reference = last_position_logits(load_model(str(bench / "original")), prompts)
    model = last_position_logits(load_model(str(bench / "other")), prompts)
    kl = kl_divergence(reference, model)  # KL(reference || model), float64
    assert kl.dtype == torch.float64 and float(kl.min()) > 0
    assert summary["kl_reference"] == pytest.approx(float(kl.mean()), rel=1e-9, abs=1e-12)
    assert summary["kl_reference_median"] == pytest.approx(float(kl.quantile(0.5)), rel=1e-9)
    assert summary["kl_reference_max"] == pytest.approx(float(kl.max()), rel=1e-9)
    plain = runner.invoke(  # the plain output shows it too
        app,
        [
            *["evaluate", "--model", str(bench / "other"), "--reference"],
            *[str(bench / "original"), "--prompts", str(bench / "prompts.txt")],
            *["--max-new-tokens", "1"],
        ],
    )
    assert plain.exit_code == 0, plain.output
    assert f"kl_reference     {summary['kl_reference']}" in plain.stdout


@pytest.mark.parametrize(
    ("reference", "expect"),
    [
        ("wide", "gives 269 logits per position and '<model>' 261: the KL needs one vocabulary"),
        (
            "reordered",
            "turn prompt 1 into different tokens (their tokenizers and chat templates give",
        ),
    ],
)
def test_a_reference_of_another_vocabulary_is_one_line(
    bench: Path, reference: str, expect: str
) -> None:
    args = [
        *["evaluate", "--model", str(bench / "original"), "--reference"],
        *[str(bench / reference), "--prompts", str(bench / "prompts.txt"), "--json"],
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = lines[0].replace(str(bench / "original"), "<model>")
    assert expect in line and f"the reference '{bench / reference}'" in line
    assert "--reference" in line  # the fix names the option


def test_the_python_function_reuses_the_kl_of_a_baseline() -> None:
    """kl_against_reference is kl_by_prompt with another model's logits as the baseline; bare
    logits are taken too (no token ids to check)."""
    cm, other = tiny_chat_model("llama"), tiny_chat_model("llama", seed=1)
    reference = Reference.of(other, PROMPTS)
    assert reference.logits.shape == (len(PROMPTS), VOCAB) and reference.token_ids is not None
    ablation = Intervention.ablation(Direction(torch.randn(32), 1, -1, "tiny"))
    kl = kl_against_reference(cm, PROMPTS, reference, ablation, batch_size=3)
    expected = kl_by_prompt(cm, PROMPTS, ablation, reference.logits)
    torch.testing.assert_close(kl, expected, rtol=0, atol=1e-9)
    bare = kl_against_reference(cm, PROMPTS, reference.logits, ablation)
    torch.testing.assert_close(bare, expected, rtol=0, atol=1e-9)
    with pytest.raises(RefdirError, match=r"expected \[3, vocab\]"):
        kl_against_reference(cm, PROMPTS[:3], reference)
