from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from refdir.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluate import intervention
from refdir.generation import last_position_logits
from refdir.intervene import ablate, add
from refdir.layer_inputs import LayerInputs
from refdir.metrics import (
    _nll,
    _Window,
    ce_loss,
    ce_loss_on_completions,
    ce_losses,
    completion_rows,
    intervention_scope,
    kl_by_prompt,
    kl_completions,
    kl_divergence,
    kl_last_position,
    kl_summary,
    load_corpus,
    text_rows,
)
from refdir.model import ChatModel
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
    assert kl_last_position(cm, PROMPTS) == 0.0
    ablated = kl_last_position(cm, PROMPTS, kind="ablate", direction=direction)
    assert ablated > 1e-6
    added = kl_last_position(cm, PROMPTS, kind="actadd", direction=direction, coeff=2.0)
    assert added > 1e-6 and added != ablated


def test_kl_last_position_takes_a_baseline_or_a_scope(cm: ChatModel, direction: Direction) -> None:
    base = last_position_logits(cm, PROMPTS)
    expected = kl_last_position(cm, PROMPTS, kind="ablate", direction=direction)
    with_base = kl_last_position(cm, PROMPTS, kind="ablate", direction=direction, baseline=base)
    assert with_base == pytest.approx(expected, rel=1e-6)
    scoped = kl_last_position(cm, PROMPTS, lambda: ablate(cm, direction), batch_size=1)
    assert scoped == pytest.approx(expected, rel=1e-4)
    factory = intervention_scope(cm, "ablate", direction)
    assert kl_last_position(cm, PROMPTS, factory, baseline=base) == pytest.approx(
        expected, rel=1e-6
    )
    by_hand = kl_divergence(base, _under(cm, direction)).mean()
    assert expected == pytest.approx(float(by_hand), rel=1e-6)


def _under(cm: ChatModel, direction: Direction) -> torch.Tensor:
    with ablate(cm, direction):
        return last_position_logits(cm, PROMPTS)


def test_kl_rejects_bad_input(cm: ChatModel, direction: Direction) -> None:
    with pytest.raises(RefdirError, match="either a scope or kind"):
        kl_last_position(cm, PROMPTS, lambda: ablate(cm, direction), kind="ablate")
    with pytest.raises(RefdirError, match="needs --direction"):
        kl_last_position(cm, PROMPTS, kind="ablate")
    with pytest.raises(RefdirError, match=r"expected \[3, vocab\]"):
        kl_last_position(cm, PROMPTS, kind="none", baseline=torch.zeros(2, 5))
    with pytest.raises(RefdirError, match="unknown intervention"):
        intervention_scope(cm, "ablation", direction)


def test_kl_completions_is_zero_without_and_positive_with_intervention(
    cm: ChatModel, direction: Direction
) -> None:
    assert kl_completions(cm, PROMPTS, COMPLETIONS, progress=False) == 0.0
    one = kl_completions(
        cm, PROMPTS, COMPLETIONS, kind="ablate", direction=direction, batch_size=1, progress=False
    )
    three = kl_completions(
        cm, PROMPTS, COMPLETIONS, lambda: ablate(cm, direction), batch_size=3, progress=False
    )
    assert one > 1e-6 and one == pytest.approx(three, rel=1e-4)


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
    with pytest.raises(RefdirError, match="batch-size must be positive"):
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
    rows = kl_by_prompt(cm, PROMPTS, kind="ablate", direction=direction, batch_size=2)
    assert rows.shape == (len(PROMPTS),) and bool((rows >= 0).all())
    mean = kl_last_position(cm, PROMPTS, kind="ablate", direction=direction, batch_size=3)
    assert float(rows.mean()) == pytest.approx(mean, rel=1e-5)
    for i, prompt in enumerate(PROMPTS):  # in the prompts' order
        one = kl_last_position(cm, [prompt], kind="ablate", direction=direction)
        assert float(rows[i]) == pytest.approx(one, rel=1e-4)


def test_kl_summary_on_a_hand_worked_case() -> None:
    kl = torch.tensor([0.0, 0.1, 0.2, 0.3, 1.0], dtype=torch.float64)
    summary = kl_summary(kl, [False, False, False, False, True])
    assert summary["median"] == pytest.approx(0.2)
    assert summary["p90"] == pytest.approx(0.72)  # linear between 0.3 and 1.0
    assert summary["max"] == pytest.approx(1.0)
    assert summary["refused_at_baseline"] == {"n": 1, "mean": 1.0}
    assert summary["answered_at_baseline"] == {"n": 4, "mean": pytest.approx(0.15)}
    assert kl_summary(kl, [False] * 5)["refused_at_baseline"] == {"n": 0, "mean": None}
    with pytest.raises(RefdirError, match="5 KL values for 4 prompts"):
        kl_summary(kl, [False] * 4)


# -- several conditions at once ------------------------------------------------------------

CONDITIONS = {"baseline": ("none", 1.0), "ablation": ("ablate", 1.0), "actadd": ("actadd", -2.0)}


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
    got = ce_losses(cm, rows, d, CONDITIONS, batch_size=2, progress=False)
    assert list(got) == list(CONDITIONS)
    for name, (kind, coeff) in CONDITIONS.items():
        with intervention(cm, kind, d, coeff):
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
    both = ce_losses(cm, rows, direction, CONDITIONS, batch_size=2, progress=False)
    alone = ce_losses(cm, rows, direction, {"actadd": ("actadd", -2.0)}, progress=False)
    with add(cm, direction, -2.0):
        plain = ce_loss(cm, TEXTS, progress=False)
    assert both["actadd"].ce == pytest.approx(plain, rel=1e-5)
    assert alone["actadd"].ce == pytest.approx(plain, rel=1e-5)
    assert both["baseline"].ce == pytest.approx(ce_loss(cm, TEXTS, progress=False), rel=1e-5)
    with pytest.raises(RefdirError, match="at least one condition"):
        ce_losses(cm, rows, direction, {})
    with pytest.raises(RefdirError, match="unknown intervention"):
        ce_losses(cm, rows, direction, {"x": ("steer", 1.0)})
    with pytest.raises(RefdirError, match="needs --direction"):
        ce_losses(cm, rows, None, {"x": ("ablate", 1.0)})


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
    ce_losses(cm, text_rows(cm, TEXTS), direction, CONDITIONS, batch_size=2, progress=False)
    assert entered == [direction.layer]
