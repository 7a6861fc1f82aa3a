from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from refdir.directions.scoring import candidate_logits
from refdir.errors import RefdirError
from refdir.model.chat_model import ChatModel
from refdir.model.layer_inputs import LayerInputs
from tiny import ARCHS, tiny_chat_model

PROMPTS = ["steal a car", "hi", "pick a lock please, quickly", "bake bread", "a poem"]


@contextmanager
def _runs(cm: ChatModel, prefix_len: int) -> Iterator[set[int]]:
    """The decoder layers whose MLP ran on the prompts' own tokens within the block (the shared
    prefix, ``prefix_len`` tokens, runs through every layer once)."""
    ran: set[int] = set()

    def seen(i: int, x: torch.Tensor) -> None:
        if x.shape[-2] != prefix_len:
            ran.add(i)

    handles = [
        part.mlp.register_forward_hook(lambda m, a, o, i=i: seen(i, a[0]))
        for i, part in enumerate(cm.layout.per_layer)
        if part.mlp is not None
    ]
    try:
        yield ran
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_passes_that_start_at_the_layer_match_full_passes(arch: str) -> None:
    cm = tiny_chat_model(arch)
    cm = ChatModel(cm.model, cm.tokenizer, system="A system prompt that every prompt shares.")
    rows = [cm.chat.token_ids(p) for p in PROMPTS]
    start = LayerInputs.record(cm, rows, batch_size=2)
    assert start is not None and start.prefix_len > 0
    torch.manual_seed(0)
    vectors = torch.randn(3, cm.d_model)
    before = candidate_logits(cm, PROMPTS, vectors[:1], "ablate", batch_size=4)
    for layer in (0, 1, cm.n_layers - 1):
        with _runs(cm, start.prefix_len) as ran:
            full = candidate_logits(cm, PROMPTS, vectors, "actadd", layer, 4.0, batch_size=4)
        assert ran == set(range(cm.n_layers))
        with _runs(cm, start.prefix_len) as ran:
            skipped = candidate_logits(cm, PROMPTS, vectors, "actadd", layer, 4.0, 4, start)
        assert ran == set(range(layer, cm.n_layers))  # the layers below computed nothing
        torch.testing.assert_close(skipped, full, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(full[0], full[1])  # the vectors matter
    # the layers compute again once the block is left
    torch.testing.assert_close(
        candidate_logits(cm, PROMPTS, vectors[:1], "ablate", batch_size=4), before
    )
    assert all("forward" not in vars(layer) for layer in cm.layout.layers)


def test_recorded_inputs_are_the_layer_inputs() -> None:
    """Every layer's recorded input, row by row, is the hidden state entering that layer in an
    ordinary unpadded forward pass of the row alone (transformers' ``hidden_states``)."""
    cm = tiny_chat_model("llama")
    cm = ChatModel(cm.model, cm.tokenizer, system="A system prompt that every prompt shares.")
    rows = [cm.chat.token_ids(p) for p in PROMPTS]
    start = LayerInputs.record(cm, rows, batch_size=2)
    assert start is not None and start.prefix_len > 0
    assert len(start.inputs) == cm.n_layers
    for i, row in enumerate(rows):
        with torch.no_grad():
            out = cm.model(
                input_ids=torch.tensor([row], device=cm.device), output_hidden_states=True
            )
        for layer in range(cm.n_layers):
            expected = out.hidden_states[layer][0, start.prefix_len :].cpu()
            torch.testing.assert_close(start.inputs[layer][i], expected, rtol=1e-4, atol=1e-5)


def test_one_prompt_without_a_shared_prefix() -> None:
    cm = tiny_chat_model("qwen2")
    rows = [cm.chat.token_ids("steal a car")]
    start = LayerInputs.record(cm, rows)
    assert start is not None and start.prefix_len == 0
    vectors = torch.randn(2, cm.d_model)
    full = candidate_logits(cm, ["steal a car"], vectors, "actadd", 1, 4.0)
    skipped = candidate_logits(cm, ["steal a car"], vectors, "actadd", 1, 4.0, start=start)
    torch.testing.assert_close(skipped, full, rtol=1e-4, atol=1e-4)


def test_other_prompts_and_errors_restore_the_layers() -> None:
    cm = tiny_chat_model("llama")
    start = LayerInputs.record(cm, [cm.chat.token_ids(p) for p in PROMPTS])
    assert start is not None
    with pytest.raises(RefdirError, match="other prompts"):
        candidate_logits(cm, PROMPTS[:3], torch.randn(1, cm.d_model), "actadd", 1, start=start)
    # an instance-level forward that was there before (accelerate's device wrapper) survives
    layer0 = cm.layout.layers[0]
    wrapper = layer0.forward
    layer0.forward = wrapper
    with pytest.raises(RuntimeError, match="inside"), start.start_at(cm, 2, {"rows": [0]}):
        assert layer0.forward is not wrapper
        raise RuntimeError("inside")
    assert vars(layer0)["forward"] is wrapper
    assert "forward" not in vars(cm.layout.layers[1])
