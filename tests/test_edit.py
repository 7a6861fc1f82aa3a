"""Weighted edits (:class:`refdir.interventions.edit.Edit`): hooks and weights agree on every
exact family, for any weights, k and the norm-preserving variant; weight 1 with one direction
is the paper's ablation; the norm-preserving edit keeps each column's length."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.interventions.edit_weights import edit_parity, edit_weights
from refdir.interventions.intervention import ablate
from refdir.interventions.projection import orthonormal
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits
from tiny import ARCHS, MORE_ARCHS, SANDWICH, tiny_chat_model

PROMPTS = ["other prompts than parity's own", "hi"]
FUSED = {"qwen3_moe", "mixtral"}


def _edit(
    cm: ChatModel,
    k: int = 2,
    norm_preserving: bool = False,
    seed: int = 1,
    per_layer: bool = False,
) -> Edit:
    g = torch.Generator().manual_seed(seed)
    n = cm.layout.n_layers
    attn = tuple(float(x) for x in torch.rand(n, generator=g) * 1.5)
    mlp = tuple(float(x) for x in torch.rand(n, generator=g))
    basis = orthonormal(torch.randn(k, cm.d_model, generator=g))
    layers = (
        torch.stack([orthonormal(torch.randn(k, cm.d_model, generator=g)) for _ in range(n)])
        if per_layer
        else None
    )
    return Edit(basis, attn, mlp, 0.7, norm_preserving, layer_basis=layers)


def _np_ok(cm: ChatModel) -> bool:
    return all(
        w.param.dim() == 2 for layer in cm.layout.per_layer for x in layer.writes for w in x.weights
    )


@pytest.mark.parametrize(
    ("norm_preserving", "per_layer"), [(False, False), (True, False), (False, True), (True, True)]
)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_edit_weights_equal_its_hooks(arch: str, norm_preserving: bool, per_layer: bool) -> None:
    cm = tiny_chat_model(arch)
    if norm_preserving and not _np_ok(cm):
        with pytest.raises(RefdirError, match="norm-preserving edit needs 2-D output weights"):
            _edit(cm, norm_preserving=True, per_layer=per_layer).hooks(cm)
        return
    edit = _edit(cm, norm_preserving=norm_preserving, per_layer=per_layer)
    plain = last_position_logits(cm, PROMPTS)
    with edit.apply(cm):
        hooked = last_position_logits(cm, PROMPTS)
    assert float((hooked - plain).abs().max()) > 1e-3  # the edit changes the logits
    report, delta = edit_parity(cm, edit)
    edited = last_position_logits(cm, PROMPTS)
    measured = float((edited - hooked).abs().max())
    if arch in SANDWICH:
        assert not report.exact and "approximate" in report.note
        assert delta > 1e-4
    else:
        assert report.exact, report.note
        assert delta < 1e-4 and measured < 1e-4


@pytest.mark.parametrize(
    "arch", [a for a in MORE_ARCHS if a not in ("minimax", "olmo2", "glm4", "bloom")]
)
def test_edit_weights_equal_its_hooks_on_more_families(arch: str) -> None:
    cm = tiny_chat_model(arch)
    edit = _edit(cm, k=1)
    _, delta = edit_parity(cm, edit)
    assert delta < 1e-4


def test_weight_one_with_one_direction_is_the_papers_ablation() -> None:
    cm = tiny_chat_model("llama")
    vector = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(3))
    with ablate(cm, vector):
        paper = last_position_logits(cm, PROMPTS)
    with Edit.ablation(vector, cm.layout.n_layers).apply(cm):
        edit = last_position_logits(cm, PROMPTS)
    torch.testing.assert_close(edit, paper, rtol=0, atol=1e-6)  # the same maps, other rounding


def test_weight_zero_changes_nothing_and_weights_scale_the_removal() -> None:
    cm = tiny_chat_model("qwen2")
    n = cm.layout.n_layers
    basis = orthonormal(torch.randn(1, cm.d_model, generator=torch.Generator().manual_seed(4)))
    plain = last_position_logits(cm, PROMPTS)
    with Edit(basis, (0.0,) * n, (0.0,) * n, 0.0).apply(cm):
        assert torch.equal(last_position_logits(cm, PROMPTS), plain)
    # the residual stream after layer 0 keeps (1 - w) of the direction the embedding wrote
    emb = cm.layout.embed.weight.detach()[5]
    for w in (0.25, 1.0):
        edit = Edit(basis, (0.0,) * n, (0.0,) * n, w)
        seen: list[torch.Tensor] = []
        with edit.apply(cm), torch.no_grad():  # read after the edit's own hook
            handle = cm.layout.layers[0].register_forward_pre_hook(
                lambda m, a, seen=seen: seen.append(a[0].detach())
            )
            try:
                cm.model(input_ids=torch.tensor([[5]]))
            finally:
                handle.remove()
        along = float(seen[0][0, 0] @ basis[0])
        assert along == pytest.approx((1 - w) * float(emb @ basis[0]), abs=1e-5)


def test_norm_preserving_keeps_every_column_length() -> None:
    cm = tiny_chat_model("llama")
    before = [
        w.param.detach().clone()
        for layer in cm.layout.per_layer
        for x in layer.writes
        for w in x.weights
    ]
    emb = cm.layout.embed.weight.detach().clone()
    edit = _edit(cm, k=2, norm_preserving=True)
    edit_weights(cm, edit)
    after = [
        w.param.detach() for layer in cm.layout.per_layer for x in layer.writes for w in x.weights
    ]
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a.norm(dim=0), b.norm(dim=0), rtol=1e-5, atol=1e-6)
        assert float((a - b).abs().max()) > 1e-4
    torch.testing.assert_close(
        cm.layout.embed.weight.norm(dim=1), emb.norm(dim=1), rtol=1e-5, atol=1e-6
    )


def test_an_edit_saves_and_loads(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    edit = _edit(cm, k=2, norm_preserving=True)
    edit = Edit(edit.basis, edit.attn, edit.mlp, edit.embed, True, {"kernel": "tent", "k": 2})
    back = Edit.load(edit.save(tmp_path))
    assert torch.equal(back.basis, edit.basis)
    assert back.attn == edit.attn and back.mlp == edit.mlp and back.embed == edit.embed
    assert back.norm_preserving and back.params == {"kernel": "tent", "k": 2}
    assert back.layer_basis is None
    per = _edit(cm, k=1, per_layer=True)
    again = Edit.load(per.save(tmp_path / "per"))
    assert again.layer_basis is not None and per.layer_basis is not None
    assert torch.equal(again.layer_basis, per.layer_basis)
    assert "per-layer" in again.describe()


def test_per_layer_directions_act_layer_by_layer() -> None:
    """A per-layer edit removes layer l's own direction from layer l's writes: with every
    layer's the edit's basis, it is the plain edit; with another direction at one layer only,
    only that layer's write changes, and the change is that removal."""
    cm = tiny_chat_model("llama")
    plain = _edit(cm, k=1)
    n = cm.layout.n_layers
    same = torch.stack([plain.basis] * n)
    copy = Edit(plain.basis, plain.attn, plain.mlp, plain.embed, layer_basis=same)
    with plain.apply(cm):
        a = last_position_logits(cm, PROMPTS)
    with copy.apply(cm):
        b = last_position_logits(cm, PROMPTS)
    assert torch.equal(a, b)
    other = same.clone()
    other[n - 1] = orthonormal(
        torch.randn(1, cm.d_model, generator=torch.Generator().manual_seed(9))
    )
    moved = Edit(plain.basis, plain.attn, plain.mlp, plain.embed, layer_basis=other)
    with moved.apply(cm):
        c = last_position_logits(cm, PROMPTS)
    assert float((c - a).abs().max()) > 1e-4
    with pytest.raises(RefdirError, match="per-layer bases are float32"):
        Edit(plain.basis, plain.attn, plain.mlp, layer_basis=same[:-1])
    with pytest.raises(RefdirError, match="orthonormal rows"):
        Edit(plain.basis, plain.attn, plain.mlp, layer_basis=same * 2)


def test_bad_edits_are_one_line_errors(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    n = cm.layout.n_layers
    basis = orthonormal(torch.randn(1, cm.d_model))
    with pytest.raises(RefdirError, match=r"must be in 0\.\.2"):
        Edit(basis, (3.0,) * n, (0.0,) * n)
    with pytest.raises(RefdirError, match="orthonormal rows"):
        Edit(torch.ones(2, cm.d_model), (0.0,) * n, (0.0,) * n)
    with pytest.raises(RefdirError, match="weights for 1 layers"):
        Edit(basis, (1.0,), (1.0,)).hooks(cm)
    with pytest.raises(RefdirError, match="linearly dependent"):
        orthonormal(torch.ones(2, 4))
    (tmp_path / "edit.safetensors").write_bytes(b"nope")
    with pytest.raises(RefdirError, match="is not an edit written by refdir"):
        Edit.load(tmp_path)


def test_an_edit_is_an_intervention_of_its_own() -> None:
    from refdir.evaluation.refusal import Job, evaluate_jobs, evaluate_refusal
    from refdir.interventions.intervention import NONE, Intervention
    from refdir.model.generation import generate

    cm = tiny_chat_model("llama")
    edit = _edit(cm, k=1)
    with pytest.raises(RefdirError, match="only it, takes an `edit`"):
        Intervention("edit")
    result = evaluate_refusal(cm, PROMPTS, "p", Intervention.edited(edit), 4, progress=False)
    with edit.apply(cm):
        alone = generate(cm, PROMPTS, 4, progress=False)
    assert [c.completion for c in result.completions] == alone
    assert result.intervention == "edit"
    with pytest.raises(RefdirError, match="decodes in batches of its own"):
        evaluate_jobs(cm, [Job("a", PROMPTS, NONE), Job("b", PROMPTS, Intervention.edited(edit))])
