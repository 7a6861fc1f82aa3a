"""Fidelity to the paper's code (andyrdt/refusal_direction): its published selections, its
epsilons, its one-stream sampling, and the paper protocol preset that gathers them."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from refdir.data import load_prompts, sample_prompts, sample_stream
from refdir.directions.selection import CandidateScores, SelectionConfig, below_layer_filter, pick
from refdir.errors import RefdirError
from refdir.measures import KL_EPSILON, REFUSAL_EPSILON, kl_divergence, refusal_metric
from refdir.study.config import PAPER_PROTOCOL, RunConfig

PUBLISHED = Path(__file__).parent / "data" / "paper_selections"
RUNS = sorted(p.stem for p in PUBLISHED.glob("*-*.json"))


def _published(run: str) -> tuple[dict[str, object], CandidateScores]:
    record = json.loads((PUBLISHED / f"{run}.json").read_text())
    positions, n_layers = record["positions"], record["n_layers"]
    grids = {
        k: torch.full((len(positions), n_layers), math.nan, dtype=torch.float64) for k in "bik"
    }
    for position, layer, bypass, induce, kl in record["scores"]:
        row = positions.index(position)
        grids["b"][row, layer], grids["i"][row, layer], grids["k"][row, layer] = bypass, induce, kl
    scores = CandidateScores(
        positions, list(range(n_layers)), grids["b"], grids["i"], grids["k"], 0, 0
    )
    return record, scores


def _paper_selection() -> SelectionConfig:
    c = RunConfig(protocol="paper")
    return SelectionConfig(
        c.kl_max, c.induce_min, c.max_layer_fraction, (), layer_rule=c.layer_rule, epsilons=True
    )


def test_five_published_runs_are_recorded() -> None:
    assert RUNS == [
        "gemma-2b-it",
        "llama-2-7b-chat-hf",
        "meta-llama-3-8b-instruct",
        "qwen-1_8b-chat",
        "yi-6b-chat",
    ]


@pytest.mark.parametrize("run", RUNS)
def test_the_paper_protocol_picks_the_published_direction(run: str) -> None:
    record, scores = _published(run)
    chosen = pick(scores, _paper_selection())
    published = record["published"]
    assert isinstance(published, dict)
    assert (chosen.position, chosen.layer) == (published["position"], published["layer"])
    assert not chosen.fallback and "int(0.8 L)" in chosen.rule


def test_the_default_layer_rule_differs_from_the_code_only_on_yi() -> None:
    """refdir's default keeps layer < 0.8 L (the paper's text): where 0.8 L is not whole it also
    keeps layer floor(0.8 L). Of the five runs, only Yi-6B has its best candidate there."""
    differ = {}
    for run in RUNS:
        record, scores = _published(run)
        chosen = pick(scores, SelectionConfig(fallback_kl_bounds=()))
        published = record["published"]
        assert isinstance(published, dict)
        if (chosen.position, chosen.layer) != (published["position"], published["layer"]):
            differ[run] = (chosen.position, chosen.layer)
    assert differ == {"yi-6b-chat": (-1, 25)}  # 0.8 x 32 = 25.6: the code discards layer 25


@pytest.mark.parametrize(
    ("n_layers", "fraction_keeps", "floor_keeps"),
    [(32, 26, 25), (30, 24, 24), (18, 15, 14), (24, 20, 19)],
)
def test_layer_rules(n_layers: int, fraction_keeps: int, floor_keeps: int) -> None:
    fraction = below_layer_filter(n_layers, SelectionConfig())
    floor = below_layer_filter(n_layers, SelectionConfig(layer_rule="floor"))
    assert int(fraction.sum()) == fraction_keeps and int(floor.sum()) == floor_keeps
    assert bool(fraction[: int(fraction.sum())].all()) and bool(floor[: int(floor.sum())].all())


def test_an_unknown_layer_rule_is_one_line() -> None:
    with pytest.raises(RefdirError, match="unknown layer rule 'ceil'; use one of fraction, floor"):
        SelectionConfig(layer_rule="ceil")


def test_epsilons_take_the_codes_form() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50, dtype=torch.float64) * 4
    ids = [3, 7]
    p = logits.softmax(-1)[:, ids].sum(-1)
    code = torch.log(p + REFUSAL_EPSILON) - torch.log(1 - p + REFUSAL_EPSILON)
    assert torch.allclose(refusal_metric(logits, ids, REFUSAL_EPSILON), code, atol=1e-10)
    exact = torch.log(p) - torch.log(1 - p)
    assert torch.allclose(refusal_metric(logits, ids), exact, atol=1e-10)
    # bounded: a token of probability ~0 gives about log(1e-8), not -inf or -700
    sure = torch.full((1, 50), -1e4, dtype=torch.float64)
    sure[0, 0] = 0.0
    assert refusal_metric(sure, [5], REFUSAL_EPSILON).item() == pytest.approx(
        math.log(1e-8), abs=1e-6
    )
    assert refusal_metric(sure, [5]).item() < -9000
    other = torch.randn(6, 50, dtype=torch.float64) * 4
    pa, pb = logits.softmax(-1), other.softmax(-1)
    code_kl = (pa * (torch.log(pa + KL_EPSILON) - torch.log(pb + KL_EPSILON))).sum(-1)
    assert torch.allclose(kl_divergence(logits, other, KL_EPSILON), code_kl, atol=1e-10)
    assert torch.allclose(kl_divergence(logits, other), (pa * (pa.log() - pb.log())).sum(-1))


def test_epsilons_lower_a_large_kl_and_keep_the_filter_sign() -> None:
    """The KL with epsilons is below the exact one where the ablated distribution puts ~0 on a
    token the baseline gives mass; the refusal metric keeps its sign (the prompt filter)."""
    base = torch.zeros(1, 10, dtype=torch.float64)
    ablated = base.clone()
    ablated[0, 0] = -40.0
    assert kl_divergence(base, ablated, KL_EPSILON) < kl_divergence(base, ablated)
    torch.manual_seed(1)
    logits = torch.randn(64, 30, dtype=torch.float64) * 3
    exact, bounded = refusal_metric(logits, [1, 2]), refusal_metric(logits, [1, 2], REFUSAL_EPSILON)
    assert torch.equal(exact > 0, bounded > 0)


def test_one_stream_sampling_reproduces_the_papers_harmless_sample() -> None:
    """The paper draws harmful_train, harmless_train, harmful_val, harmless_val and then the
    harmless evaluation prompts from one stream seeded 42; the five published runs recorded
    the same 100 harmless prompts, which one-stream sampling draws again."""
    recorded = json.loads((PUBLISHED / "harmless_sample.json").read_text())
    sets = sample_stream(
        [
            ("harmful_train", 128),
            ("harmless_train", 128),
            ("harmful_val", 32),
            ("harmless_val", 32),
            ("harmless_test_paper", 100),
        ],
        seed=42,
    )
    full = load_prompts("harmless_test_paper")
    assert sets[-1] == [full[i] for i in recorded["indices"]]
    # re-seeding each set (refdir's default) draws other harmless prompts
    assert sample_prompts("harmless_test_paper", 100, 42) != sets[-1]
    assert sets[0] == sample_prompts("harmful_train", 128, 42)  # the first set coincides
    assert len(set(sets[1]) & set(sample_prompts("harmless_train", 128, 42))) < 128


def test_one_stream_sampling_is_pythons_random_sample_in_order() -> None:
    rng = random.Random(7)
    a = rng.sample(load_prompts("harmful_val"), 5)
    b = rng.sample(load_prompts("harmless_val"), 3)
    assert sample_stream([("harmful_val", 5), ("harmless_val", 3)], seed=7) == [a, b]
    # a set asked whole is taken in file order and draws nothing from the stream
    assert (
        sample_stream([("jailbreakbench", None), ("harmful_val", 5)], seed=7)[1]
        == sample_stream([("harmful_val", 5)], seed=7)[0]
    )


def test_the_paper_protocol_preset() -> None:
    c = RunConfig(protocol="paper")
    for name, value in PAPER_PROTOCOL.items():
        assert getattr(c, name) == value, name
    assert c.harmful_eval == ("jailbreakbench",) and c.max_new_tokens == 512
    assert c.layer_rule == "floor" and c.epsilons and c.sampling == "one-stream"
    assert c.judge_min_words == 15 and c.family_refusal_tokens
    # an option given explicitly wins over the preset
    assert RunConfig(protocol="paper", max_new_tokens=64).max_new_tokens == 64
    d = RunConfig()
    assert d.protocol == "refdir" and d.layer_rule == "fraction" and not d.epsilons
    assert d.max_new_tokens == 64 and d.harmful_eval == ("harmful_test", "jailbreakbench")
