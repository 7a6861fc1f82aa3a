from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from refdir.data import Corpus, load_corpus, read_corpus
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.kl import kl_by_prompt, kl_last_position, kl_summary
from refdir.evaluation.losses import (
    _nll,
    _Window,
    ce_loss,
    ce_loss_on_completions,
    ce_losses,
    completion_rows,
    kl_completions,
    text_rows,
)
from refdir.interventions.intervention import NONE, Intervention, ablate, add
from refdir.measures import kl_divergence
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits
from refdir.model.layer_inputs import LayerInputs
from tiny import ARCHS, tiny_chat_model

PROMPTS = ["hello there", "how are you doing today?", "x"]
COMPLETIONS = ["fine, thanks", "ok", "a longer answer here"]
TEXTS = ["The cat sat.", "A much longer sentence about rivers.", "Hi"]


@pytest.fixture(scope="module")
def cm() -> ChatModel:
    return tiny_chat_model("llama", seed=1)


@pytest.fixture(scope="module")
def direction(cm: ChatModel) -> Direction:
    torch.manual_seed(0)
    return Direction(4.0 * torch.randn(cm.d_model), layer=1, position=-1, model=cm.name)


def _hand_ce(cm: ChatModel, ids: list[int], start: int) -> float:
    """Mean -log p(ids[t] | ids[:t]) for t >= start, from one unpadded forward pass."""
    with torch.no_grad():
        logits = cm.model(input_ids=torch.tensor([ids], device=cm.device)).logits[0].double()
    logp = logits.log_softmax(-1)
    return float(-torch.stack([logp[t - 1, ids[t]] for t in range(start, len(ids))]).mean())


# -- KL --------------------------------------------------------------------------------


def test_kl_divergence_matches_torch_and_is_zero_on_itself() -> None:
    torch.manual_seed(0)
    p, q = torch.randn(4, 7), torch.randn(4, 7)
    expected = torch.nn.functional.kl_div(
        q.double().log_softmax(-1), p.double().log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(kl_divergence(p, q), expected)
    assert kl_divergence(p, q).dtype == torch.float64
    assert float(kl_divergence(p, p).abs().max()) < 1e-12
    masked = p.clone()
    masked[:, 0] = float("-inf")  # a token with zero probability adds nothing, not nan
    assert torch.isfinite(kl_divergence(masked, q)).all()


def test_kl_last_position_is_zero_without_and_positive_with_intervention(
    cm: ChatModel, direction: Direction
) -> None:
    assert kl_last_position(cm, PROMPTS, NONE) == 0.0
    ablated = kl_last_position(cm, PROMPTS, Intervention.ablation(direction))
    assert ablated > 1e-6
    added = kl_last_position(cm, PROMPTS, Intervention.addition(direction, 2.0))
    assert added > 1e-6 and added != ablated


def test_kl_last_position_takes_a_baseline(cm: ChatModel, direction: Direction) -> None:
    base = last_position_logits(cm, PROMPTS)
    ablation = Intervention.ablation(direction)
    expected = kl_last_position(cm, PROMPTS, ablation)
    with_base = kl_last_position(cm, PROMPTS, ablation, baseline=base)
    assert with_base == pytest.approx(expected, rel=1e-6)
    one_by_one = kl_last_position(cm, PROMPTS, ablation, batch_size=1)
    assert one_by_one == pytest.approx(expected, rel=1e-4)
    by_hand = kl_divergence(base, _under(cm, direction)).mean()
    assert expected == pytest.approx(float(by_hand), rel=1e-6)
    # the baseline given is the one used: another one gives the KL from it
    with add(cm, direction, coeff=2.0):
        other = last_position_logits(cm, PROMPTS)
    from_other = kl_last_position(cm, PROMPTS, ablation, baseline=other)
    assert from_other == pytest.approx(float(kl_divergence(other, _under(cm, direction)).mean()))
    assert from_other != pytest.approx(expected, rel=1e-2)


def _under(cm: ChatModel, direction: Direction) -> torch.Tensor:
    with ablate(cm, direction):
        return last_position_logits(cm, PROMPTS)


def test_kl_rejects_bad_input(cm: ChatModel, direction: Direction) -> None:
    with pytest.raises(RefdirError, match="needs a `direction`"):
        Intervention("ablate")
    with pytest.raises(RefdirError, match=r"expected \[3, vocab\]"):
        kl_last_position(cm, PROMPTS, NONE, baseline=torch.zeros(2, 5))
    with pytest.raises(RefdirError, match="unknown intervention"):
        Intervention("ablation", direction)  # type: ignore[arg-type]
    with pytest.raises(RefdirError, match="has size 3"):
        kl_last_position(cm, PROMPTS, Intervention.ablation(torch.ones(3)))


def test_kl_completions_is_zero_without_and_positive_with_intervention(
    cm: ChatModel, direction: Direction
) -> None:
    assert kl_completions(cm, PROMPTS, COMPLETIONS, NONE, progress=False) == 0.0
    ablation = Intervention.ablation(direction)
    one = kl_completions(cm, PROMPTS, COMPLETIONS, ablation, batch_size=1, progress=False)
    three = kl_completions(cm, PROMPTS, COMPLETIONS, ablation, batch_size=3, progress=False)
    assert one > 1e-6 and one == pytest.approx(three, rel=1e-4)
    # by hand: KL(baseline || ablated) of the next-token distribution before every completion
    # token, teacher-forced in one unpadded pass per row, averaged over all the tokens
    per_token = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
        head = cm.chat.token_ids(prompt)
        ids = torch.tensor([head + cm.tokenizer(completion, add_special_tokens=False)["input_ids"]])
        logits = []
        for scope in (torch.no_grad(), ablate(cm, direction)):
            with scope, torch.no_grad():
                logits.append(cm.model(input_ids=ids.to(cm.device)).logits[0].cpu())
        window = slice(len(head) - 1, ids.shape[1] - 1)
        per_token.append(kl_divergence(logits[0][window], logits[1][window]))
    assert three == pytest.approx(float(torch.cat(per_token).mean()), rel=1e-4)


# -- CE --------------------------------------------------------------------------------


def test_ce_loss_equals_a_hand_computation(cm: ChatModel) -> None:
    ids = cm.tokenizer(TEXTS[0])["input_ids"]
    assert ce_loss(cm, TEXTS[:1], progress=False) == pytest.approx(_hand_ce(cm, ids, 1), rel=1e-5)
    cut = ce_loss(cm, TEXTS[1:2], max_length=6, progress=False)
    long_ids = cm.tokenizer(TEXTS[1])["input_ids"]
    assert cut == pytest.approx(_hand_ce(cm, long_ids[:6], 1), rel=1e-5)


def test_ce_loss_is_token_weighted_and_batch_size_invariant(cm: ChatModel) -> None:
    losses = [ce_loss(cm, TEXTS, batch_size=b, progress=False) for b in (1, 2, 3)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) == pytest.approx(losses[2], rel=1e-5)
    rows = [cm.tokenizer(t)["input_ids"] for t in TEXTS]
    weights = [len(r) - 1 for r in rows]
    pooled = sum(w * _hand_ce(cm, r, 1) for w, r in zip(weights, rows, strict=True)) / sum(weights)
    assert losses[0] == pytest.approx(pooled, rel=1e-5)


def test_ce_loss_on_completions_scores_only_the_response(cm: ChatModel) -> None:
    ids = cm.chat.token_ids(PROMPTS[0])
    reply = cm.tokenizer(COMPLETIONS[0], add_special_tokens=False)["input_ids"]
    expected = _hand_ce(cm, ids + reply, len(ids))
    got = ce_loss_on_completions(cm, PROMPTS[:1], COMPLETIONS[:1], progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    batched = ce_loss_on_completions(cm, PROMPTS, COMPLETIONS, batch_size=3, progress=False)
    single = ce_loss_on_completions(cm, PROMPTS, COMPLETIONS, batch_size=1, progress=False)
    assert batched == pytest.approx(single, rel=1e-5)


def test_ce_loss_runs_under_an_active_intervention(cm: ChatModel, direction: Direction) -> None:
    ids = cm.tokenizer(TEXTS[1])["input_ids"]
    plain = ce_loss(cm, TEXTS[1:2], progress=False)
    with ablate(cm, direction):
        ablated = ce_loss(cm, TEXTS[1:2], progress=False)
        assert ablated == pytest.approx(_hand_ce(cm, ids, 1), rel=1e-5)
        on_completions = ce_loss_on_completions(cm, PROMPTS, COMPLETIONS, progress=False)
    with add(cm, direction, coeff=2.0):
        added = ce_loss(cm, TEXTS[1:2], progress=False)
    assert len({plain, ablated, added}) == 3
    assert on_completions != ce_loss_on_completions(cm, PROMPTS, COMPLETIONS, progress=False)


def test_ce_loss_rejects_bad_input(cm: ChatModel) -> None:
    with pytest.raises(RefdirError, match="non-empty list"):
        ce_loss(cm, [])
    with pytest.raises(RefdirError, match="non-empty list"):
        ce_loss(cm, "one string")
    with pytest.raises(RefdirError, match="shorter than two tokens"):
        ce_loss(cm, ["a"], progress=False)
    with pytest.raises(RefdirError, match="at least 2"):
        ce_loss(cm, TEXTS, max_length=1)
    with pytest.raises(RefdirError, match="3 prompts but 2 completions"):
        ce_loss_on_completions(cm, PROMPTS, COMPLETIONS[:2])
    with pytest.raises(RefdirError, match="`batch_size` must be positive"):
        ce_loss(cm, TEXTS, batch_size=0, progress=False)


def test_packaged_corpus_is_plain_prose() -> None:
    texts = load_corpus()
    assert len(texts) >= 100 and len(set(texts)) == len(texts)
    assert all(len(t.split()) >= 20 for t in texts)
    assert load_corpus(n=3) == texts[:3]
    with pytest.raises(RefdirError, match="unknown corpus"):
        load_corpus("pile")


@pytest.mark.parametrize(
    ("prompts", "completions"),
    [
        ([PROMPTS[0], PROMPTS[1], PROMPTS[0]], ["fine, thanks", "ok", "fine, thanks a lot"]),
        ([PROMPTS[0], PROMPTS[0]], ["fine, thanks", "fine, thanks a lot"]),  # all one prompt
    ],
)
def test_ce_on_completions_reuses_a_shared_prefix_exactly(
    cm: ChatModel, direction: Direction, prompts: list[str], completions: list[str]
) -> None:
    """The shared system prompt runs once, and never reaches a scored token."""
    sys_cm = ChatModel(cm.model, cm.tokenizer, system="A system prompt that every prompt shares.")
    rows, weights = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        head = sys_cm.chat.token_ids(prompt)
        tail = sys_cm.tokenizer(completion, add_special_tokens=False)["input_ids"]
        rows.append((head + tail, len(head)))
        weights.append(len(tail))
    for scope in (None, direction):
        with ablate(sys_cm, scope) if scope is not None else torch.inference_mode():
            hand = [_hand_ce(sys_cm, ids, start) for ids, start in rows]
            got = ce_loss_on_completions(sys_cm, prompts, completions, batch_size=2, progress=False)
        pooled = sum(w * h for w, h in zip(weights, hand, strict=True)) / sum(weights)
        assert got == pytest.approx(pooled, rel=1e-5)


def test_kl_by_prompt_averages_to_the_kl_score(cm: ChatModel, direction: Direction) -> None:
    ablation = Intervention.ablation(direction)
    rows = kl_by_prompt(cm, PROMPTS, ablation, batch_size=2)
    assert rows.shape == (len(PROMPTS),) and bool((rows >= 0).all())
    mean = kl_last_position(cm, PROMPTS, ablation, batch_size=3)
    assert float(rows.mean()) == pytest.approx(mean, rel=1e-5)
    for i, prompt in enumerate(PROMPTS):  # in the prompts' order
        one = kl_last_position(cm, [prompt], ablation)
        assert float(rows[i]) == pytest.approx(one, rel=1e-4)


def test_kl_summary_on_a_hand_worked_case() -> None:
    kl = torch.tensor([0.0, 0.1, 0.2, 0.3, 1.0], dtype=torch.float64)
    summary = kl_summary(kl, [False, False, False, False, True])
    assert summary.median == pytest.approx(0.2)
    assert summary.p90 == pytest.approx(0.72)  # linear between 0.3 and 1.0
    assert summary.max == pytest.approx(1.0)
    assert summary.refused_at_baseline.model_dump() == {"n": 1, "mean": 1.0}
    assert summary.answered_at_baseline.model_dump() == {"n": 4, "mean": pytest.approx(0.15)}
    none = kl_summary(kl, [False] * 5).refused_at_baseline
    assert none.model_dump() == {"n": 0, "mean": None}
    with pytest.raises(RefdirError, match="5 KL values for 4 prompts"):
        kl_summary(kl, [False] * 4)


# -- several conditions at once ------------------------------------------------------------


def _conditions(direction: Direction) -> dict[str, Intervention]:
    return {
        "baseline": NONE,
        "ablation": Intervention.ablation(direction),
        "actadd": Intervention.addition(direction, -2.0),
    }


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_ce_losses_equal_one_scope_at_a_time(arch: str) -> None:
    """The actadd pass starts at the direction's layer from the baseline's recording, the CE
    and the first-token logits are those of separate scoped passes, and on prompt +
    completion rows the first-token logits are the prompts' last-position logits."""
    base = tiny_chat_model(arch, seed=2)
    cm = ChatModel(base.model, base.tokenizer, system="A system prompt that every prompt shares.")
    torch.manual_seed(0)
    d = Direction(6.0 * torch.randn(cm.d_model), layer=cm.n_layers - 2, position=-1, model=cm.name)
    rows = completion_rows(cm, PROMPTS, COMPLETIONS)
    conditions = _conditions(d)
    got = ce_losses(cm, rows, conditions, batch_size=2, progress=False)
    assert list(got) == list(conditions)
    for name, condition in conditions.items():
        with condition.apply(cm):
            expected = ce_loss_on_completions(
                cm, PROMPTS, COMPLETIONS, batch_size=3, progress=False
            )
            last = last_position_logits(cm, PROMPTS)
        assert got[name].ce == pytest.approx(expected, rel=1e-5)
        torch.testing.assert_close(got[name].first, last, rtol=1e-4, atol=1e-4)
    assert got["actadd"].ce != pytest.approx(got["baseline"].ce, rel=1e-3)  # the layer matters
    assert got["baseline"].n_tokens == sum(
        len(r) - s for r, s in zip(rows.ids, rows.starts, strict=True)
    )
    assert all("forward" not in vars(layer) for layer in cm.layout.layers)


def test_ce_losses_on_text_and_without_a_baseline(cm: ChatModel, direction: Direction) -> None:
    rows = text_rows(cm, TEXTS)
    conditions = _conditions(direction)
    both = ce_losses(cm, rows, conditions, batch_size=2, progress=False)
    alone = ce_losses(cm, rows, {"actadd": conditions["actadd"]}, progress=False)
    with add(cm, direction, -2.0):
        plain = ce_loss(cm, TEXTS, progress=False)
    assert both["actadd"].ce == pytest.approx(plain, rel=1e-5)
    assert alone["actadd"].ce == pytest.approx(plain, rel=1e-5)
    assert both["baseline"].ce == pytest.approx(ce_loss(cm, TEXTS, progress=False), rel=1e-5)
    with pytest.raises(RefdirError, match="at least one condition"):
        ce_losses(cm, rows, {})
    with pytest.raises(RefdirError, match="has size 3"):
        ce_losses(cm, rows, {"x": Intervention.ablation(torch.ones(3))})


def test_nll_takes_the_scored_tokens_only() -> None:
    """A hand-worked window: two rows, one with two scored tokens and one with none."""
    logits = torch.log(
        torch.tensor([[[0.5, 0.5], [0.25, 0.75], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    )
    targets = torch.tensor([[1, 0], [0, 0]])
    scored = torch.tensor([[True, True], [False, False]])
    nll = _nll(_Window(logits, targets, scored, torch.tensor([0, 2])))
    assert nll.dtype == torch.float64
    torch.testing.assert_close(
        nll, torch.tensor([-math.log(0.5), -math.log(0.25)], dtype=torch.float64)
    )


def test_ce_losses_start_the_actadd_pass_at_the_layer(
    cm: ChatModel, direction: Direction, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered: list[int] = []
    start_at = LayerInputs.start_at

    def spy(self: LayerInputs, cm: ChatModel, layer: int, live: dict[str, list[int]]) -> Any:
        entered.append(layer)
        return start_at(self, cm, layer, live)

    monkeypatch.setattr(LayerInputs, "start_at", spy)
    ce_losses(cm, text_rows(cm, TEXTS), _conditions(direction), batch_size=2, progress=False)
    assert entered == [direction.layer]


def test_a_local_corpus_of_texts_or_alpaca_records(tmp_path: Path) -> None:
    texts = tmp_path / "pile.jsonl"
    texts.write_text('{"text": "one text"}\n{"text": "another text"}\n', encoding="utf-8")
    assert read_corpus(str(texts)) == Corpus(str(texts), ["one text", "another text"])
    assert load_corpus(str(texts), 1) == ["one text"]
    records = [
        {"instruction": f"do {i}", "input": "ctx" if i % 3 == 0 else "", "output": f"done {i}"}
        for i in range(12)
    ]
    alpaca = tmp_path / "alpaca_data.json"
    alpaca.write_text(json.dumps(records), encoding="utf-8")
    corpus = read_corpus(str(alpaca))
    # the paper's order: numpy's default_rng(42) permutation (datasets' shuffle(seed=42)),
    # then the records without an input
    order = [i for i in np.random.default_rng(42).permutation(12) if i % 3 != 0]
    assert corpus.texts == [f"do {i}" for i in order]
    assert corpus.outputs == [f"done {i}" for i in order]
    assert read_corpus(str(alpaca), 2).outputs == corpus.outputs[:2]
    with pytest.raises(RefdirError, match="instructions with outputs, not plain texts"):
        load_corpus(str(alpaca))
    bad = tmp_path / "bad.json"
    bad.write_text('{"texts": 1}', encoding="utf-8")
    with pytest.raises(RefdirError, match="expected a JSON list"):
        read_corpus(str(bad))
    with pytest.raises(RefdirError, match=r"unknown corpus 'nowhere.json'; use one of prose"):
        read_corpus("nowhere.json")
