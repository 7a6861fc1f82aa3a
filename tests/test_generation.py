from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate_ids, stop_ids
from tiny import ARCHS, tiny_chat_model

PROMPTS = ["steal a car", "hi", "pick a lock please, quickly", "bake bread"]


def _hf_greedy(cm: ChatModel, prompts: list[str], n: int) -> list[list[int]]:
    """Reference: transformers' own generate, one prompt at a time (no padding, no prefix reuse)."""
    config = GenerationConfig(
        max_new_tokens=n, do_sample=False, eos_token_id=sorted(stop_ids(cm)), pad_token_id=0
    )
    out = []
    for prompt in prompts:
        ids = torch.tensor([cm.chat.token_ids(prompt)])
        with torch.inference_mode():
            new = cm.model.generate(input_ids=ids, generation_config=config)[0, ids.shape[1] :]  # type: ignore[operator]
        out.append(new.tolist())
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_matches_transformers_generate(arch: str) -> None:
    cm = tiny_chat_model(arch)
    cm = ChatModel(cm.model, cm.tokenizer, system="A system prompt that every prompt shares.")
    mine = generate_ids(
        cm, [cm.chat.token_ids(p) for p in PROMPTS], 6, batch_size=3, progress=False
    )
    assert mine == _hf_greedy(cm, PROMPTS, 6)


def test_stop_token_ends_the_answer() -> None:
    cm = tiny_chat_model("llama")
    first = generate_ids(cm, [cm.chat.token_ids("hi")], 1, progress=False)[0][0]
    cm.tokenizer.eos_token = cm.tokenizer.convert_ids_to_tokens(first)
    answer = generate_ids(cm, [cm.chat.token_ids("hi")], 8, progress=False)[0]
    assert answer == [first]


def _early_stopping_model(arch: str) -> tuple[ChatModel, list[list[int]]]:
    """A tiny model whose answers depend on the prompt, with a stop token that ends some
    answers within 3 tokens while others run on (so a batch shrinks mid-way)."""
    cm = tiny_chat_model(arch)
    with torch.no_grad():  # larger weights, so that the tiny model's answers depend on the prompt
        for weight in cm.model.parameters():
            if weight.dim() >= 2:
                weight.mul_(8)
    cm = ChatModel(cm.model, cm.tokenizer, system="A system prompt that every prompt shares.")
    rows = [cm.chat.token_ids(p) for p in PROMPTS]
    free = generate_ids(cm, rows, 6, batch_size=4, progress=False)
    stop = next(t for a in free for t in a[:3] if any(t not in b[:5] for b in free))
    cm.tokenizer.eos_token = cm.tokenizer.convert_ids_to_tokens(stop)
    cm.model.generation_config.eos_token_id = stop
    return cm, rows


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rows_that_stop_leave_the_batch(arch: str) -> None:
    cm, rows = _early_stopping_model(arch)
    mine = generate_ids(cm, rows, 6, batch_size=4, progress=False)
    assert any(len(a) < 6 for a in mine) and any(len(a) == 6 for a in mine)
    assert mine == _hf_greedy(cm, PROMPTS, 6)


def test_caches_that_cannot_drop_rows_keep_them(monkeypatch: pytest.MonkeyPatch) -> None:
    cm, rows = _early_stopping_model("qwen3")
    shrinking = generate_ids(cm, rows, 6, batch_size=4, progress=False)
    asked: list[bool] = []
    monkeypatch.setattr(
        "refdir.model.prefix.rows_selectable", lambda cache: asked.append(False) or False
    )
    riding = generate_ids(cm, rows, 6, batch_size=4, progress=False)  # no prefix, no shrinking
    assert asked  # the decoder asked, and was told no
    assert riding == shrinking == _hf_greedy(cm, PROMPTS, 6)
    assert any(len(a) < 6 for a in riding)


def test_batches_by_length_and_back() -> None:
    from refdir.errors import RefdirError
    from refdir.model.chat import by_length
    from refdir.model.generation import unsort

    rows = [[1, 2, 3], [1], [1, 2], [4], [1, 2, 3, 4]]
    chunks = by_length(rows, 2)
    assert chunks == [[1, 3], [2, 0], [4]]  # shortest first, ties in their order
    parts = [torch.tensor([[float(len(rows[i])), i] for i in chunk]) for chunk in chunks]
    back = unsort(parts, chunks)
    assert back[:, 1].tolist() == [0, 1, 2, 3, 4]
    assert back[:, 0].tolist() == [3, 1, 2, 1, 4]
    with pytest.raises(RefdirError, match="`batch_size` must be positive"):
        by_length(rows, 0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("system", [None, "A system prompt that every prompt shares."])
def test_prompts_read_in_parts_then_decoded_together(
    arch: str, system: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill in parts of similar length, caches joined (or one pass where they cannot be):
    the same answers as transformers, rows stopping mid-batch included."""
    import refdir.model.prefix as prefix

    cm, _ = _early_stopping_model(arch)
    cm = ChatModel(cm.model, cm.tokenizer, system=system)
    prompts = [*PROMPTS, "a much longer prompt about a garden and its many trees", "ok"]
    rows = [cm.chat.token_ids(p) for p in prompts]
    joined: list[bool] = []
    real = prefix._joinable
    monkeypatch.setattr(prefix, "_PREFILL_ROWS", 2)
    monkeypatch.setattr(prefix, "_joinable", lambda c: joined.append(real(c)) or real(c))
    mine = generate_ids(cm, rows, 6, batch_size=8, progress=False)
    assert mine == _hf_greedy(cm, prompts, 6)
    assert joined  # the batch of 6 was read in parts
    if arch == "llama":
        assert all(joined)  # plain key/value caches are joined, not re-read


def test_roomy_cache_layer_equals_concatenation() -> None:
    from transformers.cache_utils import DynamicLayer

    from refdir.model.prefix import _RoomyLayer

    torch.manual_seed(0)
    plain, roomy = DynamicLayer(), DynamicLayer()
    first = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    plain.update(*first)
    roomy.update(*first)
    _RoomyLayer.adopt(roomy, 1)  # room for one token: the second update must make more
    for step in range(3):
        new = torch.randn(3, 2, 1 + step, 5), torch.randn(3, 2, 1 + step, 5)
        expected = plain.update(*new)
        got = roomy.update(*new)
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    keep = torch.tensor([2, 0])
    plain.batch_select_indices(keep)
    roomy.batch_select_indices(keep)
    torch.testing.assert_close(plain.keys, roomy.keys, rtol=0, atol=0)
    assert roomy.get_seq_length() == plain.get_seq_length() == 4 + 1 + 2 + 3
    new = torch.randn(2, 2, 1, 5), torch.randn(2, 2, 1, 5)
    torch.testing.assert_close(plain.update(*new)[1], roomy.update(*new)[1], rtol=0, atol=0)
    roomy.crop(-2)
    assert roomy.get_seq_length() == 9 and roomy.keys is not None
    torch.testing.assert_close(roomy.keys, plain.keys[..., :9, :], rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rows_under_different_conditions_match_one_call_per_condition(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Baseline, ablation and two activation additions decoded in the same batches (one
    intervention per row, prompts read in parts, rows stopping mid-batch) give every row the
    answer it gets in a call of its own under the scoped intervention."""
    import refdir.model.generation as generation
    import refdir.model.prefix as prefix
    from refdir.directions.direction import Direction
    from refdir.evaluation.refusal import Job, evaluate_jobs
    from refdir.interventions.intervention import Intervention, ablate, add

    cm, rows = _early_stopping_model(arch)
    torch.manual_seed(0)
    direction = Direction(4 * torch.randn(cm.d_model), layer=1, position=-1, model="tiny")
    conditions = [("none", 1.0), ("ablate", 1.0), ("actadd", 3.0), ("actadd", -2.0)]
    alone = []
    for kind, coeff in conditions:
        scope = (
            ablate(cm, direction)
            if kind == "ablate"
            else add(cm, direction, coeff)
            if kind == "actadd"
            else contextlib.nullcontext()
        )
        with scope:
            alone.append(generate_ids(cm, rows, 6, batch_size=4, progress=False))
    assert len({str(a) for a in alone}) == len(conditions)  # the conditions differ
    monkeypatch.setattr(prefix, "_PREFILL_ROWS", 3)
    batches: list[list[int]] = []
    real = generation.generate_ids
    monkeypatch.setattr(
        "refdir.evaluation.refusal.generate_ids",
        lambda *a, **k: batches.append(k["variants"]) or real(*a, **k),
    )
    jobs = [
        Job(f"job{i}", PROMPTS, Intervention(kind, direction if kind != "none" else None, coeff))
        for i, (kind, coeff) in enumerate(conditions)
    ]
    together = evaluate_jobs(cm, jobs, 6, batch_size=7, progress=False)
    assert batches == [[v for v in range(4) for _ in PROMPTS]]  # one call for every job
    stops = generation.stop_ids(cm)
    for result, ids in zip(together, alone, strict=True):
        # the text of each answer is its tokens before the stop token that ended it
        kept = [a[:-1] if a[-1] in stops else a for a in ids]
        texts = cm.tokenizer.batch_decode(kept, skip_special_tokens=True)
        assert [r.completion for r in result.completions] == texts
    assert any(len(a) < 6 for a in alone[0]) and any(len(a) == 6 for a in alone[0])


def test_a_prompt_longer_than_the_context_is_refused_at_once(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from refdir.cli import app
    from refdir.errors import RefdirError
    from refdir.model.generation import last_position_logits

    cm = tiny_chat_model("llama")  # 256 positions; one byte, one token
    assert cm.context == 256 and cm.chat.max_tokens == 256
    long = "word " * 60
    with pytest.raises(
        RefdirError, match=r"of 3\d\d tokens .* longer than the model's context of 256"
    ):
        last_position_logits(cm, ["short", long])
    model_dir = tmp_path / "model"
    cm.model.save_pretrained(model_dir)
    cm.tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "long.txt"
    prompts.write_text(f"short\n{long}\n")
    args = [
        "evaluate",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert (
        result.exit_code == 2 and "longer than the model's context of 256 tokens" in result.stderr
    )
