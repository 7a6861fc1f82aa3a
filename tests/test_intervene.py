from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.interventions.intervention import NONE, Intervention, ablate, add
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate, last_position_logits
from tiny import tiny_chat_model


def _hook_count(cm: ChatModel) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in cm.model.modules())


def _layer_inputs(cm: ChatModel, run: Callable[[], None]) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [
        layer.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).to("cpu", copy=True)),
            with_kwargs=True,
        )
        for layer in cm.layout.layers
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _forward(cm: ChatModel) -> None:
    batch = cm.chat.encode(["hello there", "a second prompt"]).to(cm.device)
    with torch.no_grad():
        cm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_moe", "phi3"])
def test_ablation_leaves_no_component_at_any_layer(arch: str) -> None:
    cm = tiny_chat_model(arch)
    r = torch.randn(cm.d_model)
    unit = r / r.norm()
    plain = _layer_inputs(cm, lambda: _forward(cm))
    assert max(float((h @ unit).abs().max()) for h in plain) > 1e-3
    with ablate(cm, r):
        ablated = _layer_inputs(cm, lambda: _forward(cm))
    assert max(float((h @ unit).abs().max()) for h in ablated) < 1e-5


def test_ablation_applies_to_generated_tokens(cm: ChatModel) -> None:
    r = torch.randn(cm.d_model)
    with ablate(cm, r):
        seen = _layer_inputs(cm, lambda: generate(cm, ["hi"], max_new_tokens=3, progress=False))
    assert any(h.shape[1] == 1 for h in seen), "decode steps were hooked"
    assert max(float((h @ (r / r.norm())).abs().max()) for h in seen) < 1e-5


def test_addition_adds_coeff_times_direction_at_one_layer(cm: ChatModel) -> None:
    v = torch.randn(cm.d_model)
    direction = Direction(v, 1, -1, cm.name)
    plain = _layer_inputs(cm, lambda: _forward(cm))
    with add(cm, direction, coeff=2.0):
        added = _layer_inputs(cm, lambda: _forward(cm))
    torch.testing.assert_close(added[0], plain[0])
    torch.testing.assert_close(added[1], plain[1] + 2.0 * v, atol=1e-5, rtol=1e-5)


def test_ablation_needs_only_a_model_and_its_layout(cm: ChatModel) -> None:
    """refdir.ablate works on a bare transformers model, as on a ChatModel."""
    import refdir

    r = torch.randn(cm.d_model)
    with ablate(cm, r):
        wrapped = last_position_logits(cm, ["bare"])
    before = _hook_count(cm)
    with refdir.ablate(cm.model, r) as model:
        assert model is cm.model and _hook_count(cm) > before
        bare = last_position_logits(cm, ["bare"])
    assert _hook_count(cm) == before
    torch.testing.assert_close(bare, wrapped, rtol=0, atol=0)
    assert not torch.equal(bare, last_position_logits(cm, ["bare"]))


def test_an_intervention_is_a_checked_value() -> None:
    d = Direction(torch.ones(4), layer=2, position=-1, model="tiny")
    assert Intervention.addition(d, 3.0).at_layer == 2
    assert Intervention.addition(d, 3.0, layer=1).at_layer == 1
    assert (
        Intervention.ablation(d).describe() == "ablate" and NONE.hooks(torch.nn.Linear(2, 2)) == []
    )
    assert Intervention.addition(d, -1.5).describe() == "actadd x-1.5"
    with pytest.raises(RefdirError, match="needs a `direction`"):
        Intervention("actadd")
    with pytest.raises(RefdirError, match="`coeff` must be a finite number"):
        Intervention.addition(d, float("nan"))
    with pytest.raises(RefdirError, match="give the `layer`"):
        Intervention.addition(torch.ones(4))
    with pytest.raises(RefdirError, match="1-D tensor"):
        Intervention.ablation(torch.ones(2, 2))


def test_hooks_are_removed_after_an_exception(cm: ChatModel) -> None:
    before = _hook_count(cm)
    with pytest.raises(ZeroDivisionError), ablate(cm, torch.randn(cm.d_model)):
        assert _hook_count(cm) > before
        _ = 1 / 0
    assert _hook_count(cm) == before


def test_bad_layer_or_size_registers_nothing(cm: ChatModel) -> None:
    before = _hook_count(cm)
    with (
        pytest.raises(RefdirError, match=r"layers 0\.\.2"),
        add(cm, torch.randn(cm.d_model), layer=7),
    ):
        pass
    with pytest.raises(RefdirError, match="size 5"), ablate(cm, torch.randn(5)):
        pass
    with pytest.raises(RefdirError, match="zero"), ablate(cm, torch.zeros(cm.d_model)):
        pass
    assert _hook_count(cm) == before


def test_scopes_nest_and_unwind(cm: ChatModel) -> None:
    r = torch.randn(cm.d_model)
    base = last_position_logits(cm, ["nest"])
    with ablate(cm, r):
        ablated = last_position_logits(cm, ["nest"])
        with add(cm, Direction(r, 1, -1, cm.name), coeff=3.0):
            both = last_position_logits(cm, ["nest"])
        torch.testing.assert_close(last_position_logits(cm, ["nest"]), ablated)
    torch.testing.assert_close(last_position_logits(cm, ["nest"]), base)
    assert not torch.allclose(ablated, base) and not torch.allclose(both, ablated)


def test_last_position_logits_match_the_full_forward(cm: ChatModel) -> None:
    prompts = ["one", "two words", "three words here"]
    logits = last_position_logits(cm, prompts, batch_size=2)
    batch = cm.chat.encode(prompts).to(cm.device)
    with torch.no_grad():
        full = cm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
            :, -1
        ]
    full = full.cpu()
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral"])
def test_shared_prefix_cache_gives_the_same_logits(arch: str) -> None:
    cm = tiny_chat_model(arch)
    cm = ChatModel(cm.model, cm.tokenizer, system="A long shared system prompt for every row.")
    prompts = ["one", "two words here", "three words and more", "x"]
    r = torch.randn(cm.d_model)
    widths: list[int] = []  # the tokens of each pass through the first layer
    handle = cm.layout.layers[0].register_forward_pre_hook(
        lambda m, a, k: widths.append((a[0] if a else k["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    with ablate(cm, r):
        cached = last_position_logits(cm, prompts, batch_size=3)
        cached_widths, widths[:] = list(widths), []
        plain = last_position_logits(cm, prompts, batch_size=3, reuse_prefix=False)
    handle.remove()
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    # the prefix ran once, and the batches only the tokens after it
    assert len(cached_widths) == len(widths) + 1
    assert cached_widths[0] + max(cached_widths[1:]) == max(widths)


def test_row_conditions_check_their_input(cm: ChatModel) -> None:
    from refdir.interventions.rows import RowConditions

    direction = Direction(torch.ones(cm.d_model), layer=1, position=-1, model="tiny")
    other = Direction(-torch.ones(cm.d_model), layer=1, position=-1, model="tiny")
    with pytest.raises(RefdirError, match="share one direction"):
        RowConditions(cm, [Intervention.ablation(direction), Intervention.ablation(other)])
    with pytest.raises(RefdirError, match=r"add at layers \[0, 1\]"):
        RowConditions(
            cm,
            [Intervention.addition(direction), Intervention.addition(direction, layer=0)],
        )
    assert RowConditions(cm, [NONE]).hooks() == []
    rows = RowConditions(cm, [NONE, Intervention.addition(direction, 2.0)])
    ((_, _, hook),) = rows.hooks()  # one addition hook, no ablation hooks
    x = torch.zeros(3, 2, cm.d_model)
    rows.select(torch.tensor([0, 1]))
    with pytest.raises(RefdirError, match="do not match the batch"):
        hook(cm.layout.layers[1], (x,), {})
    rows.select(torch.tensor([0, 1, 0]))
    (shifted,), _ = hook(cm.layout.layers[1], (x,), {})
    assert shifted[1].eq(2.0).all() and shifted[[0, 2]].eq(0).all()
