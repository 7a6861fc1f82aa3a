"""Fidelity to the paper's code (andyrdt/refusal_direction): its published selections, its
epsilons, its one-stream sampling, and the paper protocol preset that gathers them."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from refdir.data import load_prompts, sample_prompts, sample_stream
from refdir.directions import refusal_tokens
from refdir.directions.refusal_tokens import family_refusal_tokens
from refdir.directions.selection import CandidateScores, SelectionConfig, below_layer_filter, pick
from refdir.errors import RefdirError
from refdir.measures import KL_EPSILON, REFUSAL_EPSILON, kl_divergence, refusal_metric
from refdir.model.chat import ChatFormat
from refdir.study.config import PAPER_PROTOCOL, RunConfig
from refdir.study.run import run_pipeline
from tiny import LLAMA2_TEMPLATE, TINY_RUN, sentencepiece_tokenizer, tiny_chat_model

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


def _vocab_tokenizer(size: int, at: dict[int, str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``size`` tokens with the given tokens at the given ids, which
    decodes ``▁`` as a space (as SentencePiece vocabularies do)."""
    vocab = {f"t{i}": i for i in range(size)}
    for i, token in at.items():
        del vocab[f"t{i}"]
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


@pytest.mark.parametrize(
    ("model_type", "size", "at", "family", "ids"),
    [
        ("llama", 32000, {306: "▁I"}, "llama-2", (306,)),
        ("llama", 128256, {40: "I"}, "llama-3", (40,)),
        ("qwen2", 151936, {40: "I", 2121: "As"}, "qwen", (40, 2121)),
        ("qwen", 151851, {40: "I", 2121: "As"}, "qwen", (40, 2121)),
        ("gemma", 256000, {235285: "I"}, "gemma", (235285,)),
        ("llama", 64000, {59597: "I"}, "yi", (59597,)),
    ],
)
def test_the_papers_refusal_tokens_by_family(
    model_type: str, size: int, at: dict[int, str], family: str, ids: tuple[int, ...]
) -> None:
    found = family_refusal_tokens(_vocab_tokenizer(size, at), model_type)
    assert found is not None and found.family == family and found.ids == ids


@pytest.mark.parametrize(
    ("model_type", "size", "at"),
    [
        ("llama", 49152, {40: "I"}),  # SmolLM2's vocabulary size: not a family of the paper
        ("llama", 32000, {306: "▁the"}),  # Llama-2's size, but 306 is not "I"
        ("mistral", 32000, {306: "▁I"}),  # Mistral's ids are not fixed by the paper's code
        ("qwen2", 151936, {40: "I", 2121: "So"}),
    ],
)
def test_other_models_have_no_fixed_refusal_tokens(
    model_type: str, size: int, at: dict[int, str]
) -> None:
    assert family_refusal_tokens(_vocab_tokenizer(size, at), model_type) is None


def test_refusal_tokens_are_the_ids_the_model_emitted(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a dummy-prefix tokenizer, a refusal that starts with the token ``I`` decodes to
    "I cannot ..."; tokenizing that text again gives ``▁I``, another id. The derived refusal
    token is the id the model emitted."""
    tokenizer = sentencepiece_tokenizer(LLAMA2_TEMPLATE)
    vocab = tokenizer.get_vocab()
    emitted = [vocab["I"], vocab["▁c"], vocab["an"], vocab["n"], vocab["o"], vocab["t"]]
    answer = [vocab["▁c"], vocab["an"]]  # " can": no refusal
    cm = SimpleNamespace(
        tokenizer=tokenizer, chat=ChatFormat.from_tokenizer(tokenizer), model=SimpleNamespace()
    )

    def scripted(
        _cm: object, rows: list[list[int]], *args: object, **kw: object
    ) -> list[list[int]]:
        return [emitted if i % 4 else answer for i in range(len(rows))]

    monkeypatch.setattr(refusal_tokens, "generate_ids", scripted)
    found = refusal_tokens.derive_refusal_tokens(cm, ["a", "b", "c", "d", "e"], progress=False)  # type: ignore[arg-type]
    assert tokenizer.decode(emitted) == "I cannot"
    assert found.ids == (vocab["I"],) and found.n_refusals == 3 and found.coverage == 1.0
    retokenized = tokenizer("I cannot", add_special_tokens=False)["input_ids"][0]
    assert retokenized == vocab["▁I"] != vocab["I"]  # what reading the decoded text would give


def test_a_run_under_the_paper_protocol(tmp_path: Path) -> None:
    """A whole run on a tiny model with ``protocol="paper"``: one-stream samples, the code's
    layer filter and epsilons in selection.json, JailbreakBench alone with its categories, and
    the protocol named in metrics.json and the report."""
    given = {k: v for k, v in TINY_RUN.model_dump().items() if k not in PAPER_PROTOCOL}
    config = RunConfig(**{**given, "protocol": "paper", "n_eval_harmful": 3, "max_new_tokens": 2})
    assert config.layer_rule == "floor" and config.harmful_eval == ("jailbreakbench",)
    run_pipeline(config, tmp_path, progress=False, model=tiny_chat_model("llama"))
    prompts = json.loads((tmp_path / "prompts.json").read_text())
    stream = sample_stream(
        [
            (config.harmful_train, config.n_train),
            (config.harmless_train, config.n_train),
            (config.harmful_val, config.n_val),
            (config.harmless_val, config.n_val),
            (config.harmless_eval, config.n_eval_harmless),
            ("jailbreakbench", 3),
        ],
        config.seed,
    )
    assert [
        prompts[k] for k in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")
    ] == stream[:4]
    harmless = (tmp_path / "completions" / "harmless.baseline.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in harmless] == stream[4]
    filters = json.loads((tmp_path / "selection.json").read_text())["filters"]
    assert filters["layer_rule"] == "floor" and filters["epsilons"] is True
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["protocol"] == "paper"
    assert metrics["sizes"]["harmful_eval"] == {"jailbreakbench": 3}
    assert set(metrics["harmful"]["by_category"]) == {"jailbreakbench"}
    long = metrics["harmful"]["refusal_score_long"]  # TINY_RUN's long_tokens, 4 > 2
    assert long["max_new_tokens"] == 4 and set(long["by_set"]) == {"jailbreakbench"}
    report = (tmp_path / "report.md").read_text()
    assert "the paper protocol" in report and "int(0.8 L)" in report
