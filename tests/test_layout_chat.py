from __future__ import annotations

import pytest
import torch

from refdir.errors import RefdirError
from refdir.interventions.orthogonalization import parity
from refdir.model.chat import ChatFormat
from refdir.model.chat_model import ChatModel
from refdir.model.layout import find_layout
from refdir.model.layout_spec import LayoutSpec
from tiny import ARCHS, DEVICE, SANDWICH, tiny_chat_model, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layout_found_for_every_family(arch: str) -> None:
    layout = find_layout(tiny_model(arch))
    assert layout.n_layers == 3 and layout.d_model == 32
    assert layout.sandwich == (arch in SANDWICH)
    for layer in layout.per_layer:
        assert layer.mlp_out, "an MLP output weight is found"
        for weight in layer.mlp_out:
            assert weight.param.shape[weight.axis] == 32


def test_moe_experts_are_fused_tensors() -> None:
    layout = find_layout(tiny_model("mixtral"))
    (weight,) = layout.per_layer[0].mlp_out
    assert weight.name == "down_proj" and weight.param.dim() == 3 and weight.axis == -2


def test_unsupported_model_names_what_is_missing() -> None:
    with pytest.raises(RefdirError, match="MLP block"):
        find_layout(tiny_model("llama"), LayoutSpec(mlp="nonexistent"))
    with pytest.raises(RefdirError, match="decoder layers"):
        find_layout(torch.nn.Linear(2, 2))


def test_layout_override_reaches_parts_by_name() -> None:
    """A part under a name the defaults miss is found by the override, and edited there."""
    model = tiny_model("llama")
    for layer in model.model.layers:  # down_proj registered as "proj_back"; forward unchanged
        down = layer.mlp._modules.pop("down_proj")
        layer.mlp.register_module("proj_back", down)
        layer.mlp.__dict__["down_proj"] = down
    with pytest.raises(RefdirError, match="output projection of mlp in layer 0"):
        find_layout(model)
    spec = LayoutSpec(layers="model.layers", mlp_out="proj_back")
    layout = find_layout(model, spec)
    assert layout.layers is model.model.layers
    for part, layer in zip(layout.per_layer, model.model.layers, strict=True):
        (weight,) = part.mlp_out
        assert weight.module is layer.mlp.proj_back
    report, delta = parity(ChatModel(model, tiny_tokenizer(), layout_spec=spec), torch.randn(32))
    assert report.exact and delta < 1e-4  # the renamed projections were orthogonalized


def test_post_instruction_tokens_are_the_template_suffix() -> None:
    chat = ChatFormat.from_tokenizer(tiny_tokenizer())
    assert chat.suffix == "<|im_end|>\n<|im_start|>assistant\n"
    batch = chat.encode(["hi", "a much longer instruction"])
    assert batch.input_ids.shape[0] == 2
    for row in batch.input_ids:
        assert tuple(row[-chat.n_post :].tolist()) == chat.suffix_ids
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1, 0] == 1  # left padding


def test_system_prompt_and_user_template() -> None:
    chat = ChatFormat.from_tokenizer(tiny_tokenizer(), system="Be brief.")
    assert "Be brief." in chat.prefix
    custom = ChatFormat.from_tokenizer(
        tiny_tokenizer(None), chat_template="Q: {{ messages[-1]['content'] }}\nA:"
    )
    assert custom.suffix == "\nA:" and custom.n_post == 3


def test_missing_chat_template_is_a_clear_error() -> None:
    with pytest.raises(RefdirError, match="no chat template"):
        ChatFormat.from_tokenizer(tiny_tokenizer(None))
    with pytest.raises(RefdirError, match="nothing after the instruction"):
        ChatFormat.from_tokenizer(
            tiny_tokenizer(None), chat_template="{{ messages[-1]['content'] }}"
        )


def test_chat_model_wraps_any_model() -> None:
    cm = ChatModel(tiny_model("qwen2"), tiny_tokenizer(), name="x")
    assert cm.n_layers == 3 and cm.device.type == torch.device(DEVICE).type
    assert cm.name == "x" and cm.d_model == 32 and not cm.layout.tied
    assert tiny_chat_model("gemma").layout.tied  # Gemma ties its embeddings by default
