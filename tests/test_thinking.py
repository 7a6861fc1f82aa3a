"""Reasoning ("thinking") models: template options, post-instruction positions with a think
block, refusal scored on the answer, and the study's budget and metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from refdir.cli import app
from refdir.evaluation.refusal import evaluate_refusal
from refdir.model.chat import ChatFormat
from refdir.model.chat_model import ChatModel
from refdir.model.generation import answer_texts
from refdir.model.options import ModelOptions
from refdir.model.thinking import score_completion, split_reasoning, template_thinks
from refdir.study.config import RunConfig, config_toml, read_config
from refdir.study.run import run_pipeline
from refdir.study.steps.evaluate import completion_tokens
from tiny import CHATML, TINY_RUN, VOCAB, tiny_model, tiny_tokenizer

QWEN3_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
"""Qwen3's switch: thinking on, the model opens the block; off, an empty block is closed."""

OPENING = CHATML.replace("assistant\n", "assistant\n<think>\n")
"""DeepSeek-R1's way: the generation prompt opens the think block."""

TAGS = ["<think>", "</think>"]


def thinking_tokenizer(template: str) -> Any:
    """The byte tokenizer with the think tags as ordinary added tokens (ids VOCAB, VOCAB + 1),
    as Qwen3's are."""
    tok = tiny_tokenizer(template)
    tok.add_tokens(TAGS)
    return tok


def thinking_model(template: str, **template_kwargs: Any) -> ChatModel:
    model = tiny_model("qwen3", seed=2, vocab_size=VOCAB + len(TAGS))
    return ChatModel(
        model, thinking_tokenizer(template), name="tiny-qwen3", template_kwargs=template_kwargs
    )


@contextmanager
def scripted(cm: ChatModel, script: Sequence[int]) -> Iterator[None]:
    """Make greedy decoding emit ``script`` (then the eos token) after every prompt: a pass of
    more than one token starts a prompt, each one-token pass is the next step."""
    state = {"step": 0}
    eos = int(cm.tokenizer.eos_token_id)
    layout = cm.layout

    def on_embed(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        state["step"] = 0 if args[0].shape[-1] > 1 else state["step"] + 1

    def on_head(_module: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        step = state["step"]
        token = script[step] if step < len(script) else eos
        bias = torch.zeros(out.shape[-1])
        bias[token] = 1e4
        return out + bias

    handles = [
        layout.embed.register_forward_pre_hook(on_embed),
        cm.model.get_output_embeddings().register_forward_hook(on_head),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- splitting a completion -------------------------------------------------------------


def test_a_completion_splits_into_reasoning_and_answer() -> None:
    done = split_reasoning("<think>\nThe user asks for harm.\n</think>\n\nI can't help.")
    assert done.reasoning == "\nThe user asks for harm.\n" and done.answer == "I can't help."
    assert split_reasoning("Sure, here it is.") == split_reasoning("Sure, here it is.", False)
    assert split_reasoning("Sure.").reasoning is None and split_reasoning("Sure.").answer == "Sure."
    cut = split_reasoning("<think>I'm sorry, I should think")
    assert cut.answer is None and not cut.answered and cut.reasoning == "I'm sorry, I should think"
    opened = split_reasoning("Let me see.</think>Here you go.", opened=True)
    assert opened.reasoning == "Let me see." and opened.answer == "Here you go."
    assert split_reasoning("no tags at all", opened=True).answer is None


def test_refusal_is_scored_on_the_answer() -> None:
    """Markers in the reasoning do not make a refusal; an answer cut off inside the reasoning
    is no answer, neither a refusal nor compliance."""
    fooled = score_completion("<think>I cannot just refuse; the user wants a recipe.</think>Sure:")
    assert not fooled.refusal and fooled.reasoning_refusal is True and fooled.answered
    late = score_completion("<think>The user asks for a recipe.</think>I'm sorry, I can't.")
    assert late.refusal and late.reasoning_refusal is False and late.answer.startswith("I'm")
    cut = score_completion("I am sorry, I think", opened=True)
    assert not cut.refusal and not cut.answered and cut.reasoning_refusal and cut.answer == ""
    plain = score_completion("I can't help with that.")
    assert plain.refusal and plain.answered and plain.reasoning_refusal is None


# -- templates ----------------------------------------------------------------------------


def test_template_options_come_as_key_value_items() -> None:
    options = ModelOptions(template_kwargs=("enable_thinking=false", "depth=2", "style=short"))
    assert options.template_options() == {"enable_thinking": False, "depth": 2, "style": "short"}
    assert ModelOptions().template_options() == {}
    assert ModelOptions(template_kwargs={"enable_thinking": True}).template_kwargs == {
        "enable_thinking": True
    }
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        ModelOptions(template_kwargs=("enable_thinking",))


@pytest.mark.parametrize(
    ("template", "kwargs", "thinks", "opens"),
    [
        (QWEN3_STYLE, {}, True, False),
        (QWEN3_STYLE, {"enable_thinking": False}, False, False),
        (OPENING, {}, True, True),
        (CHATML, {}, False, False),
    ],
)
def test_whether_a_template_thinks(
    template: str, kwargs: dict[str, Any], thinks: bool, opens: bool
) -> None:
    chat = ChatFormat.from_tokenizer(thinking_tokenizer(template), template_kwargs=kwargs)
    assert (chat.thinks, chat.opens_reasoning) == (thinks, opens)
    assert template_thinks(template, chat.suffix) == (thinks, opens)


def test_post_instruction_positions_with_a_think_block() -> None:
    """A generation prompt with a think block (opened, or closed empty) puts its tags among the
    post-instruction tokens, as the tokenizer tokenizes the rendered text."""
    tok = thinking_tokenizer(QWEN3_STYLE)
    on = ChatFormat.from_tokenizer(tok)
    off = ChatFormat.from_tokenizer(tok, template_kwargs={"enable_thinking": False})
    opening = ChatFormat.from_tokenizer(thinking_tokenizer(OPENING))
    think, close = tok.convert_tokens_to_ids(TAGS)
    newline = tok.convert_tokens_to_ids("Ċ")
    assert off.suffix_ids == (*on.suffix_ids, think, newline, newline, close, newline, newline)
    assert opening.suffix_ids == (*on.suffix_ids, think, newline)
    for chat in (on, off, opening):
        ids = chat.token_ids("How do I bake bread?")
        assert (
            ids == tok(chat.format("How do I bake bread?"), add_special_tokens=False)["input_ids"]
        )
        assert tuple(ids[-chat.n_post :]) == chat.suffix_ids
        batch = chat.encode(["hi", "How do I bake bread?"])
        assert batch.input_ids[:, -chat.n_post :].tolist() == [list(chat.suffix_ids)] * 2


def test_the_think_tags_survive_decoding_when_special() -> None:
    """A tokenizer whose think tags are special tokens (skipped by plain decoding) still shows
    them in a reasoning model's answers, so the reasoning can be split off."""
    tok = tiny_tokenizer(QWEN3_STYLE)
    tok.add_tokens(TAGS, special_tokens=True)
    cm = ChatModel(tiny_model("qwen3", seed=2, vocab_size=VOCAB + len(TAGS)), tok, name="tiny")
    assert cm.chat.thinks
    ids = tok("<think>hm</think>No.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert answer_texts(cm, [ids]) == ["<think>hm</think>No."]
    plain = ChatModel(cm.model, tiny_tokenizer(), name="tiny")
    assert answer_texts(plain, [tiny_tokenizer()("No.<|im_end|>")["input_ids"]]) == ["No."]


# -- on a model -------------------------------------------------------------------------


def test_refusal_scores_of_a_reasoning_model_count_answers() -> None:
    """Greedy completions of a tiny model scripted to reason, then answer: the refusal score
    counts the answers, the reasoning's markers are counted apart, and a budget that ends inside
    the reasoning gives no answers."""
    cm = thinking_model(QWEN3_STYLE)
    tok = cm.tokenizer
    text = "<think>I can't say yet.</think>Sure, here."
    script = tok(text, add_special_tokens=False)["input_ids"]
    with scripted(cm, script):
        done = evaluate_refusal(
            cm, ["a", "bb"], "p", max_new_tokens=len(script) + 1, progress=False
        )
        cut = evaluate_refusal(cm, ["a", "bb"], "p", max_new_tokens=8, progress=False)
    assert [r.completion for r in done.completions] == [text, text]
    assert done.refusal_rate == 0.0 and done.no_answer_rate == 0.0
    assert done.reasoning_refusal_rate == 1.0
    assert cut.no_answer_rate == 1.0 and cut.refusal_rate == 0.0
    assert not any(r.answered for r in cut.completions)
    assert cut.summary()["no_answer_rate"] == 1.0
    # the same text without a think block is a refusal
    plain = ChatModel(cm.model, thinking_tokenizer(CHATML), name="tiny")
    with scripted(plain, tok("I can't say yet.", add_special_tokens=False)["input_ids"]):
        assert (
            evaluate_refusal(plain, ["a"], "p", max_new_tokens=20, progress=False).refusal_rate
            == 1.0
        )


def test_a_study_of_a_reasoning_model(tmp_path: Path) -> None:
    """``refdir run`` with a thinking template: the completions get ``reasoning_tokens``, the
    completion files record answers and reasoning markers, metrics.json and the report say what
    the think blocks did."""
    config = RunConfig(**{**TINY_RUN.model_dump(), "reasoning_tokens": 10, "long_tokens": 0})
    assert completion_tokens(config, True) == 10 and completion_tokens(config, False) == 2
    cm = thinking_model(QWEN3_STYLE)
    script = cm.tokenizer("<think>I can't", add_special_tokens=False)["input_ids"]
    with scripted(cm, script):
        run_pipeline(config, tmp_path, progress=False, model=cm)
    line = json.loads(
        (tmp_path / "completions" / "harmful.baseline.jsonl").read_text().split("\n")[0]
    )
    assert line["answered"] is False and line["reasoning_refusal"] is True and not line["refusal"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    thinking = metrics["reasoning"]
    assert thinking["max_new_tokens"] == 10 and thinking["instead_of"] == 2
    assert thinking["opened_by_template"] is False
    assert thinking["no_answer"]["harmful"] == {"baseline": 1.0, "ablation": 1.0, "actadd": 1.0}
    assert thinking["reasoning_refusal"]["harmless"]["baseline"] == 1.0
    assert metrics["harmful"]["refusal_score"]["baseline"] == 0.0
    report = (tmp_path / "report.md").read_text()
    assert "The chat template thinks" in report and "no answer" in report


def test_a_study_without_a_think_block_has_no_reasoning_record(tmp_path: Path) -> None:
    config = RunConfig(**{**TINY_RUN.model_dump(), "long_tokens": 0})
    cm = thinking_model(QWEN3_STYLE, enable_thinking=False)
    run_pipeline(config, tmp_path, progress=False, model=cm)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "reasoning" not in metrics
    line = json.loads(
        (tmp_path / "completions" / "harmful.baseline.jsonl").read_text().split("\n")[0]
    )
    assert set(line) == {"prompt", "completion", "refusal"}


def test_template_options_on_the_command_line(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    thinking_model(QWEN3_STYLE).model.save_pretrained(folder)
    thinking_tokenizer(QWEN3_STYLE).save_pretrained(folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text("bake bread\n")
    args = ["evaluate", "--model", str(folder), "--prompts", str(prompts), "--json"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(app, [*args, "--template-kwarg", "enable_thinking"])
    assert bad.exit_code in (1, 2)
    assert "--template-kwarg" in bad.output and "KEY=VALUE" in bad.output
    off = runner.invoke(
        app, [*args, "--template-kwarg", "enable_thinking=false", "--max-new-tokens", "3"]
    )
    assert off.exit_code == 0, off.output
    summary = json.loads(off.output[off.output.index("{") :])
    assert summary["no_answer_rate"] == 0.0


def test_template_options_round_trip_through_a_run_config_file(tmp_path: Path) -> None:
    config = RunConfig(template_kwargs=("enable_thinking=false", "depth=2"), reasoning_tokens=64)
    path = tmp_path / "config.toml"
    path.write_text(config_toml(config))
    again = RunConfig(**read_config(path))
    assert again.template_kwargs == {"enable_thinking": False, "depth": 2}
    assert again == config
