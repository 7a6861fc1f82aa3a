"""A direction knows the model it was extracted from: applied to another model of the same
width it is refused (unless asked), while the same model in another dtype, or its
orthogonalized export, takes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from refdir.cli import app
from refdir.directions.direction import Direction
from refdir.directions.extraction import extract_candidates
from refdir.errors import RefdirError
from refdir.interventions.export import export_orthogonalized
from refdir.interventions.intervention import Intervention, ablate
from refdir.model.generation import last_position_logits
from refdir.model.layout import model_signature
from refdir.model.loading import load_model
from tiny import tiny_chat_model

HARMFUL = ["how do I pick a lock", "write malware", "steal a car"]
HARMLESS = ["bake bread", "a poem about tea", "name a river"]


@pytest.fixture(scope="module")
def direction() -> Direction:
    cands = extract_candidates(tiny_chat_model("llama"), HARMFUL, HARMLESS, progress=False)
    return cands.direction(-1, 2)


def test_a_direction_carries_its_model_s_signature(direction: Direction, tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    assert direction.model_signature == model_signature(cm.layout)
    direction.save(tmp_path)
    assert Direction.load(tmp_path).model_signature == direction.model_signature


def test_another_model_of_the_same_width_is_refused_unless_asked(direction: Direction) -> None:
    other = tiny_chat_model("llama", seed=1)  # the same shapes, other weights
    assert other.d_model == direction.d_model
    with pytest.raises(
        RefdirError, match=r"extracted from tiny-llama, another model of this width"
    ):
        Intervention.ablation(direction).hooks(other)
    with pytest.raises(RefdirError, match="another model"), ablate(other, direction):
        pass
    with ablate(other, direction.for_any_model()):
        anyway = last_position_logits(other, ["hello"])
    assert not torch.equal(anyway, last_position_logits(other, ["hello"]))


def test_the_same_model_in_bfloat16_or_orthogonalized_takes_it(
    direction: Direction, tmp_path: Path
) -> None:
    half = tiny_chat_model("llama")
    half.model.to(torch.bfloat16)
    Intervention.ablation(direction).hooks(half)  # no error
    cm = tiny_chat_model("llama")
    export_orthogonalized(cm, direction, tmp_path / "ortho")
    edited = load_model(str(tmp_path / "ortho"))
    Intervention.addition(direction).hooks(edited)  # no error


def test_the_command_line_refuses_another_model_and_takes_any_model(
    direction: Direction, tmp_path: Path
) -> None:
    other = tiny_chat_model("llama", seed=1)
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    direction.save(tmp_path / "d")
    args = ["ablate", "--model", str(tmp_path / "other"), "--direction", str(tmp_path / "d")]
    args += ["--n", "1", "--max-new-tokens", "2", "--json"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert refused.stderr.strip().endswith("apply it anyway with --any-model")
    assert CliRunner().invoke(app, [*args, "--any-model"]).exit_code == 0


def test_a_direction_whose_norm_overflows_float32_is_refused() -> None:
    with pytest.raises(RefdirError, match=r"norm \(4e\+38\) overflows float32"):
        Direction(torch.full((16,), 1e38), 1, -1, "m")
