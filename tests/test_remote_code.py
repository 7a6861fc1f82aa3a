"""Code from a model's folder never runs unless asked: neither for the studied model nor for a
judge, and the error says how to allow it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refdir.cli import app
from refdir.errors import RefdirError
from refdir.evaluation.judges import load_judge
from refdir.model.loading import load_model
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def custom(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder of a type transformers does not know, whose code (if run) leaves a file."""
    folder, ran = tmp_path / "custom", tmp_path / "RAN"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "refdir_custom"
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        f"open({str(ran)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'refdir_custom'\n"
    )
    (folder / "modeling_custom.py").write_text(
        f"open({str(ran)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM\n"
        "class CustomModel(LlamaForCausalLM):\n    pass\n"
    )
    return folder, ran


def test_a_model_s_code_does_not_run_unless_asked(custom: tuple[Path, Path]) -> None:
    folder, ran = custom
    with pytest.raises(
        RefdirError, match=r"needs code from its repository .*`trust_remote_code=True`"
    ):
        load_model(str(folder))
    assert not ran.exists()


def test_a_judge_s_code_does_not_run_unless_asked(custom: tuple[Path, Path]) -> None:
    folder, ran = custom
    with pytest.raises(RefdirError, match=r"judge model .* needs code from its repository"):
        load_judge("llamaguard", str(folder), progress=False)
    assert not ran.exists()


def test_the_command_line_names_its_flag(custom: tuple[Path, Path]) -> None:
    folder, ran = custom
    result = CliRunner().invoke(app, ["evaluate", "--model", str(folder), "--n", "1"], input="y\n")
    assert result.exit_code == 2
    assert "allow it with --trust-remote-code, only for a model you trust" in result.stderr
    assert not ran.exists()
