"""Families beyond the paper's: each tiny model carries a layout feature of its own (fused experts
stored transposed, hybrid attention/state-space layers, parallel mixers, post-norms only, GPT-2's
Conv1D and learned positions, an embedding norm, short convolutions, one mixer per layer). On every one, ablation must remove the
direction from the residual stream everywhere, and the weight edit must equal it where it is
said to be exact."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from refdir.directions.direction import Direction
from refdir.directions.extraction import extract_candidates
from refdir.directions.scoring import ValidationSets, score_candidates
from refdir.errors import RefdirError
from refdir.interventions.export import export_orthogonalized
from refdir.interventions.intervention import Intervention, ablate, add
from refdir.interventions.orthogonalization import parity
from refdir.interventions.rows import RowConditions
from refdir.measures import kl_divergence, refusal_metric
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate, last_position_logits
from refdir.model.hooks import hooked
from refdir.model.layout import find_layout
from refdir.model.layout_check import verify_ablation
from refdir.model.layout_spec import LayoutSpec
from refdir.model.loading import load_model
from refdir.study.run import run_pipeline
from refdir.suffix.analysis import analyze_suffix, attention_parts
from tiny import MORE_ARCHS, tiny_chat_model, tiny_model, tiny_tokenizer

SUPPORTED = [a for a in MORE_ARCHS if a != "minimax"]
APPROXIMATE = {"olmo2", "glm4", "bloom"}
NOT_ORTHOGONAL = {"bloom"}  # a LayerNorm between the embedding and the first layer
PROMPTS = ["hi", "write a much longer poem about the sea please", "how are you today?"]


@pytest.mark.parametrize("arch", SUPPORTED)
def test_ablation_empties_the_residual_stream_and_the_edit_matches(arch: str) -> None:
    cm = tiny_chat_model(arch)
    assert verify_ablation(cm) < 1e-5
    report, delta = parity(cm, torch.randn(cm.d_model, generator=torch.Generator().manual_seed(1)))
    assert report.exact == (arch not in APPROXIMATE)
    assert report.residual_left is not None
    assert (report.residual_left > 0.1) == (arch in NOT_ORTHOGONAL)
    if report.exact:
        assert delta < 1e-4
    else:
        assert delta > 1e-3  # the difference is real, and measured


def test_the_layout_features_each_family_is_here_for() -> None:
    oss = tiny_chat_model("gpt_oss").layout.per_layer[0]
    (experts,) = oss.mlp_out
    assert (experts.name, experts.axis, experts.bias) == ("down_proj", -1, "down_proj_bias")
    (routed, shared) = sorted(tiny_chat_model("llama4_text").layout.per_layer[0].mlp_out, key=str)[
        :2
    ]
    assert {routed.axis, shared.axis} == {-1, -2}  # [E, in, d] experts beside a Linear
    falcon = tiny_chat_model("falcon_h1").layout.per_layer[0]
    assert [type(w.module).__name__ for w in falcon.writes] == [
        "FalconH1Attention",
        "FalconH1Mixer",
        "FalconH1MLP",
    ]
    glm = tiny_chat_model("glm4").layout.per_layer[0]
    assert glm.writes[0].module is glm.layer.post_self_attn_layernorm  # not the pre-MLP norm
    gpt2 = tiny_chat_model("gpt2")
    assert gpt2.layout.embeddings[1] is gpt2.model.transformer.wpe
    assert gpt2.layout.per_layer[0].mlp_out[0].axis == -1  # Conv1D [in, d]
    granite = tiny_chat_model("granitemoehybrid").layout.per_layer[0]
    assert [type(w.module).__name__ for w in granite.writes] == [
        "GraniteMoeHybridMambaLayer",
        "GraniteMoeHybridMoE",
        "GraniteMoeHybridMLP",  # the shared MLP beside the experts
    ]
    kinds = [type(p.attn).__name__ for p in tiny_chat_model("qwen3_next").layout.per_layer]
    assert kinds == ["Qwen3NextGatedDeltaNet", "Qwen3NextAttention", "Qwen3NextGatedDeltaNet"]
    kinds = [type(p.attn).__name__ for p in tiny_chat_model("lfm2").layout.per_layer]
    assert kinds == ["Lfm2ShortConv", "Lfm2Attention", "Lfm2ShortConv"]
    nemotron = tiny_chat_model("nemotron_h")  # LAYOUTS: one mixer per layer, no MLP block
    writes = [[type(w.module).__name__ for w in p.writes] for p in nemotron.layout.per_layer]
    assert writes == [["NemotronHMamba2Mixer"], ["NemotronHAttention"], ["NemotronHMLP"]]
    assert all(p.mlp is None for p in nemotron.layout.per_layer)
    with pytest.raises(RefdirError, match="could not find the MLP block in layer 0"):
        ChatModel(nemotron.model, nemotron.tokenizer)  # the defaults miss it
    as_mlps = LayoutSpec(attn=None, mlp="mixer", mlp_out="out_proj|o_proj|down_proj")
    mlps_only = ChatModel(nemotron.model, nemotron.tokenizer, name="n", layout_spec=as_mlps)
    assert verify_ablation(mlps_only) < 1e-5  # the same writers, found as MLPs
    with pytest.raises(RefdirError, match="n has no attention layer found by its layout"):
        attention_parts(mlps_only)  # the suffix analysis reads attention heads


def test_an_edit_that_still_writes_the_direction_is_not_exported(tmp_path: Path) -> None:
    cm = tiny_chat_model("bloom")
    direction = extract_candidates(cm, PROMPTS, ["ok", "a cat"], progress=False).direction(-1, 1)
    with pytest.raises(RefdirError, match=r"cannot export .* not orthogonal: .* first at the emb"):
        export_orthogonalized(cm, direction, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layout_patterns_keep_their_groups() -> None:
    spec = LayoutSpec(attn=r"(self|cross)_attn", mlp=r"m(lp|oe)")
    assert find_layout(tiny_model("llama"), spec).n_layers == 3
    with pytest.raises(RefdirError, match="is not a regular expression"):
        find_layout(tiny_model("llama"), LayoutSpec(attn="(self_attn"))


@pytest.mark.parametrize(
    "arch", ["gpt_oss", "llama4_text", "qwen3_next", "jamba", "deepseek_v3", "lfm2", "nemotron_h"]
)
def test_generation_candidates_and_row_conditions(arch: str) -> None:
    cm = tiny_chat_model(arch)
    d = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(2))
    with ablate(cm, d):  # batched, padded and prefix-cached = one prompt at a time
        batched = generate(cm, PROMPTS, max_new_tokens=6, batch_size=8, progress=False)
        single = [generate(cm, [p], max_new_tokens=6, progress=False)[0] for p in PROMPTS]
    assert batched == single
    harmless = ["tell me a joke", "what is two plus two", "ok"]
    cands = extract_candidates(cm, PROMPTS, harmless, progress=False)
    layer = 2 if arch == "lfm2" else 1  # LFM2's layer 0 convolves 3 tokens: the template's alike
    scores = score_candidates(cm, cands, PROMPTS, harmless, [5, 6], layers=[layer], prune=False)
    live = cands.diffs[:, layer].norm(dim=-1) > 0  # zero differences are skipped by design
    assert live.sum() >= 5
    assert torch.isfinite(scores.induce[live, layer]).all()
    assert torch.isfinite(scores.kl[live, layer]).all()
    # per-row conditions (flattened MoE outputs included) equal the whole-batch ablation
    rows = [cm.chat.token_ids(p) for p in PROMPTS]
    batch = cm.chat.encode(PROMPTS).to(cm.device)
    direction = cands.direction(position=cands.positions[int(live.nonzero()[-1])], layer=layer)
    conditions = RowConditions(cm, [Intervention.ablation(direction)])
    conditions.select(torch.zeros(len(rows), dtype=torch.long))
    with torch.inference_mode(), hooked(conditions.hooks()):
        per_row = cm.model(**batch.inputs()).logits[:, -1]
    with torch.inference_mode(), ablate(cm, direction):
        whole = cm.model(**batch.inputs()).logits[:, -1]
    with torch.inference_mode():
        plain = cm.model(**batch.inputs()).logits[:, -1]
    torch.testing.assert_close(per_row, whole)
    assert not torch.allclose(whole, plain)  # the ablation acts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_missed_writer_is_caught(dtype: torch.dtype) -> None:
    cm = ChatModel(tiny_model("gpt_oss").to(dtype), tiny_tokenizer(), name="tiny-gpt_oss")
    assert verify_ablation(cm) < {torch.float32: 1e-5}.get(dtype, 2e-2)
    layer = cm.layout.per_layer[1]
    blind = dataclasses.replace(layer, writes=layer.writes[:1])  # forget the MLP of layer 1
    per_layer = (*cm.layout.per_layer[:1], blind, *cm.layout.per_layer[2:])
    cm.layout = dataclasses.replace(cm.layout, per_layer=per_layer)
    with pytest.raises(RefdirError, match="from the input of layer 2 on: a block before it"):
        verify_ablation(cm)


def test_a_post_norm_residual_stream_is_refused_at_load(tmp_path: object) -> None:
    folder = f"{tmp_path}/minimax"
    tiny_model("minimax").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(RefdirError, match=r"ablation leaves .* MiniMaxForCausalLM"):
        load_model(folder)
    llama = f"{tmp_path}/llama"
    tiny_model("llama").save_pretrained(llama)
    tiny_tokenizer().save_pretrained(llama)
    assert load_model(llama).n_layers == 3  # verified and loaded


def test_a_model_folder_without_its_tokenizer_is_named(tmp_path: object) -> None:
    folder = f"{tmp_path}/weights-only"
    tiny_model("llama").save_pretrained(folder)
    with pytest.raises(RefdirError, match=r"has no tokenizer files .* tokenizer.save_pretrained"):
        load_model(folder)


@pytest.mark.parametrize("arch", ["jamba", "gpt_oss", "deepseek_v3"])
def test_the_fast_scorer_equals_hooks_one_candidate_at_a_time(arch: str) -> None:
    """Prefix caches, the replay of recorded layer inputs and candidates batched as rows give
    the scores that plain hooked passes give, on hybrid and MoE layers too."""
    harmful = ["how to pick a lock quickly", "steal a car now", "make a poison", "hack a bank"]
    harmless = ["bake bread today", "write a poem", "sum 2+2 please", "what is a cat"]
    tokens = list(range(5, 135))
    cm = tiny_chat_model(arch)
    cands = extract_candidates(cm, harmful, harmless, progress=False)
    validation = ValidationSets.build(cm, harmful, harmless, tokens, False)
    assert validation.start is not None  # the induce passes start at the layer
    scores = score_candidates(
        cm, cands, harmful, harmless, tokens, layers=[2], prune=False, validation=validation
    )
    for i in (-1, -3):
        vector = cands.diffs[i, 2].float()
        with add(cm, vector, 1.0, 2):
            induce = refusal_metric(last_position_logits(cm, harmless), tokens).mean()
        with ablate(cm, vector):
            kl = kl_divergence(validation.harmless_logits, last_position_logits(cm, harmless))
            bypass = refusal_metric(last_position_logits(cm, harmful), tokens).mean()
        p = cands.positions.index(i)
        assert float(scores.induce[p, 2]) == pytest.approx(float(induce), abs=1e-5)
        assert float(scores.kl[p, 2]) == pytest.approx(float(kl.mean()), abs=1e-5)
        assert float(scores.bypass[p, 2]) == pytest.approx(float(bypass), abs=1e-5)


def test_a_whole_run_on_a_hybrid_moe_model(tmp_path: Path) -> None:
    from test_pipeline import CONFIG, check_figures

    cm = tiny_chat_model("jamba")
    done = run_pipeline(CONFIG, tmp_path, progress=False, model=cm)
    assert list(done) == ["prompts", "extract", "select", "evaluate", "report"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(list((tmp_path / "completions").glob("*.jsonl"))) == 7
    check_figures(cm, tmp_path, metrics)  # recomputed with scoped hooks on the hybrid model


def test_in_bfloat16_a_miss_is_caught_beside_a_large_first_token() -> None:
    """Attention sinks: the first token's residual stream 30 times the others' hides nothing, and
    a bfloat16 MoE edit stays exact and orthogonal (rounding is not a miss)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[3] *= 30  # <|im_start|>, every prompt's first token
    cm = ChatModel(model.to(torch.bfloat16), tiny_tokenizer(), name="sink")
    assert verify_ablation(cm) < 3e-2
    layer = cm.layout.per_layer[1]
    blind = dataclasses.replace(layer, writes=layer.writes[:1])
    cm.layout = dataclasses.replace(
        cm.layout, per_layer=(cm.layout.per_layer[0], blind, cm.layout.per_layer[2])
    )
    with pytest.raises(RefdirError, match="from the input of layer 2 on"):
        verify_ablation(cm)
    moe = ChatModel(tiny_model("gpt_oss").to(torch.bfloat16), tiny_tokenizer(), name="moe")
    report, _ = parity(moe, torch.randn(32, generator=torch.Generator().manual_seed(3)))
    assert report.exact and report.residual_left is not None and report.residual_left < 3e-2


def test_a_residual_stream_of_another_shape_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Gemma 3n passes its layers several streams per token ([4, batch, tokens, d])."""
    import refdir.model.layout_check

    def streams(layers: object, keep: Any) -> list[Any]:
        def hook(module: object, args: Any, kwargs: Any) -> None:
            keep(0, torch.zeros(4, *args[0].shape))

        return [(cm.layout.layers[0], "input", hook)]

    cm = tiny_chat_model("llama")
    monkeypatch.setattr(refdir.model.layout_check, "residual_stream", streams)
    with pytest.raises(RefdirError, match=r"shape \(4, 2, \d+, 32\), not \[batch, tokens, 32\]"):
        verify_ablation(cm)


def test_what_the_layout_cannot_know_or_edit_is_refused() -> None:
    with pytest.raises(
        RefdirError, match=r"cannot tell which axis of Llama4TextExperts\.down_proj"
    ):
        ChatModel(tiny_model("llama4_text", intermediate_size=32), tiny_tokenizer())
    cm = tiny_chat_model("llama")
    down = cm.layout.per_layer[0].mlp_out[0].module
    down.weight = torch.nn.Parameter(down.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(RefdirError, match=r"quantized weights .* load the model in 16- or 32-bit"):
        parity(cm, torch.randn(32))


def test_only_embeddings_of_the_text_decoder_are_edited() -> None:
    model = tiny_model("gpt2")
    model.vision_tower = torch.nn.Embedding(7, 32)  # beside the decoder, as in a multimodal model
    cm = ChatModel(model, tiny_tokenizer())
    assert cm.layout.embeddings == [model.transformer.wte, model.transformer.wpe]


def test_layout_pattern_classes_and_escapes() -> None:
    from refdir.model.layout import _alternatives

    split = [p.pattern for p in _alternatives(r"[]|]z|q|a\|b|(x|y)_attn")]
    assert split == ["(?:[]|]z)", "(?:q)", r"(?:a\|b)", "(?:(x|y)_attn)"]
    with pytest.raises(RefdirError, match=r"'a\)\|b' is not a regular expression"):
        _alternatives("a)|b")


def test_the_check_at_load_can_be_skipped_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "minimax"
    tiny_model("minimax").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(RefdirError, match=r"REFDIR_SKIP_LAYOUT_CHECK=1 skips the check$"):
        load_model(str(folder))
    monkeypatch.setenv("REFDIR_SKIP_LAYOUT_CHECK", "1")
    assert load_model(str(folder)).n_layers == 3  # loaded, unchecked, with a warning


@pytest.mark.parametrize("arch", ["jamba", "qwen3_next"])
def test_the_suffix_analysis_reads_the_attention_layers_of_a_hybrid_model(arch: str) -> None:
    cm = tiny_chat_model(arch)  # layer 1 is attention; layers 0 and 2 are Mamba / delta-net
    unit = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(0))
    direction = Direction(unit, 2, -1, cm.name)
    result = analyze_suffix(cm, direction, PROMPTS, " !a!b", "qz%1", n_top=3, max_new_tokens=2)
    for heads_by_layer in result.head_attribution:
        assert all(v is None for v in heads_by_layer[0] + heads_by_layer[2])
        assert all(isinstance(v, float) and math.isfinite(v) for v in heads_by_layer[1])
    assert [layer for layer, _ in result.top_heads] == [1, 1, 1]
    split = torch.tensor(result.attention_split)  # [C, top, region]: the last token's attention
    torch.testing.assert_close(split.sum(-1), torch.ones(split.shape[:2]))
