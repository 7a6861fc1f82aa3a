from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.export import export_orthogonalized
from refdir.interventions.intervention import ablate
from refdir.interventions.orthogonalization import orthogonalize, parity
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits
from tiny import ARCHS, SANDWICH, tiny_chat_model


def _direction(cm: ChatModel, seed: int = 1) -> Direction:
    torch.manual_seed(seed)
    return Direction(torch.randn(cm.d_model), 1, -1, cm.name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_weights_equal_hook_ablation(arch: str) -> None:
    cm = tiny_chat_model(arch)
    direction = _direction(cm)
    prompts = ["other prompts than parity's own", "hi"]
    plain = last_position_logits(cm, prompts)
    with ablate(cm, direction):
        hooked = last_position_logits(cm, prompts)
    assert float((hooked - plain).abs().max()) > 1e-3  # the ablation changes the logits
    report, delta = parity(cm, direction)
    edited = last_position_logits(cm, prompts)  # the model is edited in place
    measured = float((edited - hooked).abs().max())
    if arch in SANDWICH:
        assert not report.exact and "approximate" in report.note
        assert 1e-3 < delta < 1.0 and measured > 1e-3  # a real difference, measured and recorded
    else:
        assert report.exact
        assert delta < 1e-4 and measured < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tied_embeddings_are_untied_and_parity_holds(arch: str) -> None:
    cm = tiny_chat_model(arch, tied=True)
    assert cm.layout.tied
    report, delta = parity(cm, _direction(cm))
    assert report.untied_embeddings and not cm.model.config.tie_word_embeddings
    assert cm.layout.unembed.weight is not cm.layout.embed.weight  # type: ignore[union-attr]
    if arch == "llama":
        assert delta < 1e-4


@pytest.mark.parametrize("arch", sorted(SANDWICH))
def test_sandwich_edit_still_writes_nothing_along_the_direction(arch: str) -> None:
    cm = tiny_chat_model(arch)
    direction = _direction(cm)
    orthogonalize(cm, direction)
    unit = direction.unit()
    seen: list[float] = []
    handles = [
        layer.register_forward_pre_hook(
            lambda m, a, k: seen.append(
                float(((a[0] if a else k["hidden_states"]).cpu() @ unit).abs().max())
            ),
            with_kwargs=True,
        )
        for layer in cm.layout.layers
    ]
    last_position_logits(cm, ["check the stream"])
    for h in handles:
        h.remove()
    assert max(seen) < 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "mixtral", "gemma"])
def test_export_reloads_as_an_ordinary_checkpoint(arch: str, tmp_path: Path) -> None:
    cm = tiny_chat_model(arch)
    direction = _direction(cm)
    prompts = ["export me", "and me too"]
    with ablate(cm, direction):
        hooked = last_position_logits(cm, prompts)
    out = tmp_path / "ortho"
    manifest = export_orthogonalized(cm, direction, out)
    assert manifest.exact is True and manifest.parity_max_abs_logit_delta < 1e-4
    assert (out / "model.safetensors").exists() and (out / "direction.safetensors").exists()
    assert json.loads((out / "refdir_manifest.json").read_text())["direction"]["layer"] == 1
    reloaded = ChatModel(AutoModelForCausalLM.from_pretrained(out), cm.tokenizer)
    torch.testing.assert_close(last_position_logits(reloaded, prompts), hooked, atol=1e-4, rtol=0)
    assert not any(p.name.startswith(".ortho") for p in tmp_path.iterdir())


def test_export_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(RefdirError, match="not an empty folder"):
        export_orthogonalized(cm, _direction(cm), tmp_path)


def test_orthogonalize_refuses_the_wrong_size() -> None:
    cm = tiny_chat_model("llama")
    with pytest.raises(RefdirError, match="size 7"):
        orthogonalize(cm, Direction(torch.ones(7), 1, -1, "m"))
