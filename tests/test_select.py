from __future__ import annotations

import math

import pytest
import torch

from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.directions.extraction import extract_candidates
from refdir.directions.prompt_filter import filter_prompts
from refdir.directions.scoring import ValidationSets, candidate_logits, score_candidates
from refdir.directions.selection import CandidateScores, SelectionConfig, pick
from refdir.errors import RefdirError
from refdir.evaluation.kl import random_direction_kl
from refdir.interventions.intervention import ablate, add
from refdir.measures import kl_divergence, refusal_metric
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits
from refdir.model.layer_inputs import LayerInputs
from tiny import tiny_chat_model

NAN = math.nan


def _scores(
    bypass: list[list[float]], induce: list[list[float]], kl: list[list[float]]
) -> CandidateScores:
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return CandidateScores([-2, -1], list(range(5)), t(bypass), t(induce), t(kl), 2.0, -3.0)


# Worked by hand: 2 positions x 5 layers; 0.8 L = 4, so layer 4 is out.
#   (-1, 1) has the lowest bypass (-9) but KL 0.5     -> out
#   (-2, 4) has bypass -8 but sits at layer 4          -> out
#   (-1, 2) has bypass -7 but induce -0.1              -> out
#   (-2, 3) bypass -4, induce 1, KL 0.05               -> passes, the pick
#   (-1, 3) bypass -2, passes but higher bypass
BYPASS = [[NAN, 0.0, 1.0, -4.0, -8.0], [NAN, -9.0, -7.0, -2.0, 0.5]]
INDUCE = [[NAN, 0.5, 0.5, 1.0, 2.0], [NAN, 0.5, -0.1, 0.2, 3.0]]
KL = [[NAN, 0.01, 0.02, 0.05, 0.01], [NAN, 0.5, 0.03, 0.09, 0.01]]


def test_paper_filter_and_pick_on_a_hand_worked_case() -> None:
    chosen = pick(_scores(BYPASS, INDUCE, KL))
    assert (chosen.position, chosen.layer) == (-2, 3)
    assert chosen.bypass == -4.0 and not chosen.fallback and chosen.rule.startswith("paper")
    assert chosen.n_candidates == 6  # layers 1-3 x 2 positions (layer 0 zero, layer 4 >= 0.8 L)
    # passing: (-2,1), (-2,2), (-2,3), (-1,3)
    assert chosen.n_passed == 4


def test_fallback_relaxes_only_the_kl_bound_and_says_so() -> None:
    kl = [[NAN, 0.3, 0.3, 0.6, 0.01], [NAN, 0.2, 0.3, 0.9, 0.01]]
    chosen = pick(_scores(BYPASS, INDUCE, kl))
    assert chosen.fallback and "relaxed to 0.25" in chosen.rule
    assert (chosen.position, chosen.layer) == (-1, 1)  # the only one with kl <= 0.25 below layer 4
    assert chosen.n_passed == 0


def test_nothing_passes_even_relaxed_is_an_error() -> None:
    kl = [[NAN, 3.0, 3.0, 3.0, 0.01], [NAN, 3.0, 3.0, 3.0, 0.01]]
    with pytest.raises(RefdirError, match="no candidate passes"):
        pick(_scores(BYPASS, INDUCE, kl))
    relaxable = _scores(BYPASS, INDUCE, [[NAN, 0.3] + [0.3] * 3] * 2)
    assert pick(relaxable).fallback  # passes once the KL bound is relaxed to 0.5 ...
    with pytest.raises(RefdirError, match="no candidate passes"):  # ... and not without
        pick(relaxable, SelectionConfig(fallback_kl_bounds=()))


def test_refusal_metric_is_the_log_odds_of_the_refusal_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    metric = refusal_metric(logits, [0])
    torch.testing.assert_close(
        metric, torch.tensor([0.0, math.log(0.1 / 0.9)], dtype=torch.float64)
    )
    assert float(kl_divergence(logits, logits).abs().max()) < 1e-12


def _tiny_candidates() -> tuple[ChatModel, list[str], list[str], Candidates]:
    cm: ChatModel = tiny_chat_model("llama")
    harmful = ["steal a car", "pick a lock", "make poison"]
    harmless = ["bake bread", "a poem", "sum"]
    return cm, harmful, harmless, extract_candidates(cm, harmful, harmless, progress=False)


def test_scores_on_a_tiny_model() -> None:
    cm, harmful, harmless, cands = _tiny_candidates()
    scores = score_candidates(
        cm, cands, harmful[:2], harmless[:2], [5, 6], progress=False, prune=False
    )
    assert scores.bypass.shape == (cm.chat.n_post, cm.n_layers)
    assert torch.isnan(scores.bypass[:, 0]).all()  # zero candidates skipped
    assert torch.isfinite(scores.bypass[:, 1:]).all() and (scores.kl[:, 1:] > 0).all()
    # the baselines: mean refusal log-odds of the unablated model on each set
    for prompts, baseline in (
        (harmful[:2], scores.baseline_harmful),
        (harmless[:2], scores.baseline_harmless),
    ):
        metric = refusal_metric(last_position_logits(cm, prompts), [5, 6])
        assert baseline == pytest.approx(float(metric.mean()), abs=1e-6)
    # one candidate's three scores, by hand with scoped hooks
    d = cands.direction(-1, 1)
    with ablate(cm, d):
        bypass = refusal_metric(last_position_logits(cm, harmful[:2]), [5, 6]).mean()
        ablated = last_position_logits(cm, harmless[:2])
    with add(cm, d, 1.0):
        induce = refusal_metric(last_position_logits(cm, harmless[:2]), [5, 6]).mean()
    kl = kl_divergence(last_position_logits(cm, harmless[:2]), ablated).mean()
    p = cands.positions.index(-1)
    assert float(scores.bypass[p, 1]) == pytest.approx(float(bypass), abs=1e-5)
    assert float(scores.induce[p, 1]) == pytest.approx(float(induce), abs=1e-5)
    assert float(scores.kl[p, 1]) == pytest.approx(
        float(kl), abs=0, rel=3e-4
    )  # not KL(ablated || base)


def test_pruned_scores_keep_the_pick() -> None:
    cm, harmful, harmless, cands = _tiny_candidates()
    full = score_candidates(
        cm, cands, harmful[:2], harmless[:2], [5, 6], progress=False, prune=False
    )
    finite = torch.isfinite(full.induce)
    # a threshold that rejects about half the candidates on induce, and a KL bound that rejects some
    induce_min = float(full.induce[finite].median())
    # a bound between two candidates' KL, not at one: a GPU's rounding cannot move one across
    kls = full.kl[finite & (full.induce >= induce_min)].sort().values
    kl_bound = float(kls[len(kls) // 2 : len(kls) // 2 + 2].mean())
    config = SelectionConfig(
        kl_max=kl_bound / 2,
        induce_min=induce_min,
        max_layer_fraction=1.0,
        fallback_kl_bounds=(kl_bound,),
    )
    pruned = score_candidates(cm, cands, harmful[:2], harmless[:2], [5, 6], config, progress=False)
    torch.testing.assert_close(pruned.induce, full.induce, equal_nan=True)
    induced = finite & (full.induce >= induce_min)
    assert 0 < int(induced.sum()) < int(finite.sum())
    assert torch.isnan(pruned.kl[~induced]).all()  # KL only where induce passes
    torch.testing.assert_close(pruned.kl[induced], full.kl[induced], atol=1e-6, rtol=1e-4)
    viable = induced & (full.kl <= kl_bound)
    assert 0 < int(viable.sum()) < int(induced.sum())
    assert torch.isnan(pruned.bypass[~viable]).all()
    torch.testing.assert_close(pruned.bypass[viable], full.bypass[viable], atol=1e-5, rtol=1e-5)
    a, b = pick(pruned, config), pick(full, config)
    assert (a.position, a.layer, a.rule, a.n_candidates) == (
        b.position,
        b.layer,
        b.rule,
        b.n_candidates,
    )


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_moe"])
def test_batched_candidates_equal_one_at_a_time(arch: str) -> None:
    from refdir.directions.scoring import candidate_logits
    from refdir.interventions.intervention import ablate, add
    from refdir.model.generation import last_position_logits

    cm = tiny_chat_model(arch)
    cm = ChatModel(cm.model, cm.tokenizer, system="A shared system prompt for every prompt.")
    prompts = ["steal a car", "pick a lock please", "x"]
    vectors = torch.randn(3, cm.d_model)
    ablated = candidate_logits(cm, prompts, vectors, "ablate", batch_size=4).cpu()
    added = candidate_logits(cm, prompts, vectors, "actadd", layer=1, coeff=2.0, batch_size=4).cpu()
    assert ablated.dtype == torch.float32 and ablated.shape == (3, 3, cm.model.config.vocab_size)
    for i, v in enumerate(vectors):
        with ablate(cm, v):
            torch.testing.assert_close(
                ablated[i], last_position_logits(cm, prompts), atol=1e-5, rtol=1e-5
            )
        with add(cm, v, 2.0, layer=1):
            torch.testing.assert_close(
                added[i], last_position_logits(cm, prompts), atol=1e-5, rtol=1e-5
            )


def test_random_direction_kl_is_the_kl_score_of_seeded_random_directions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from refdir.evaluation.kl import kl_last_position
    from refdir.interventions.intervention import Intervention

    cm = tiny_chat_model("llama")
    prompts = ["bake bread", "name a river in France", "x"]
    base = last_position_logits(cm, prompts)
    kl = random_direction_kl(cm, prompts, n=3, seed=7, baseline=base, batch_size=2)
    assert kl.shape == (3,) and kl.dtype == torch.float64
    seeded = torch.Generator().manual_seed(7)
    vectors = torch.randn(3, cm.d_model, generator=seeded, dtype=torch.float64)
    for value, v in zip(kl.tolist(), vectors, strict=True):
        d = Direction(v.float(), layer=1, position=-1, model=cm.name)
        scoped = kl_last_position(cm, prompts, Intervention.ablation(d), baseline=base)
        assert value == pytest.approx(scoped, rel=1e-4, abs=1e-7)
    assert (kl > 0).all() and len(set(kl.tolist())) == 3
    monkeypatch.setattr("refdir.evaluation.kl._RANDOM_GROUP", 2)  # groups of 2 + 1 directions
    grouped = random_direction_kl(cm, prompts, n=3, seed=7, baseline=base, batch_size=2)
    torch.testing.assert_close(grouped, kl, rtol=1e-4, atol=1e-7)
    own_baseline = random_direction_kl(cm, prompts, n=3, seed=7)
    torch.testing.assert_close(own_baseline, kl, rtol=1e-4, atol=1e-7)
    other = base.flip(0)  # a baseline given is the one the KL is taken from
    first = Intervention.ablation(Direction(vectors[0].float(), 1, -1, cm.name))
    from_other = float(random_direction_kl(cm, prompts, n=1, seed=7, baseline=other)[0])
    assert from_other == pytest.approx(kl_last_position(cm, prompts, first, baseline=other))
    assert from_other != pytest.approx(float(kl[0]), rel=0.5)
    other_seed = random_direction_kl(cm, prompts, n=3, seed=8, baseline=base)
    assert not torch.allclose(other_seed, kl, rtol=1e-2)
    with pytest.raises(RefdirError, match="1 or more"):
        random_direction_kl(cm, prompts, n=0)
    with pytest.raises(RefdirError, match="baseline logits"):
        random_direction_kl(cm, prompts, n=1, baseline=base[:2])


def test_layer_filter_prunes_whole_layers_and_keeps_the_count() -> None:
    cm, harmful, harmless, cands = _tiny_candidates()
    config = SelectionConfig(kl_max=1e9, induce_min=-1e9, max_layer_fraction=0.5)
    args = (cm, cands, harmful[:2], harmless[:2], [5, 6], config)
    full = score_candidates(*args, progress=False, prune=False)
    pruned = score_candidates(*args, progress=False)
    cut = math.ceil(0.5 * cm.n_layers)
    assert torch.isnan(pruned.induce[:, cut:]).all() and torch.isfinite(full.induce[:, cut:]).all()
    a, b = pick(pruned, config), pick(full, config)
    assert (a.position, a.layer, a.n_candidates) == (b.position, b.layer, b.n_candidates)
    assert a.n_candidates == int(torch.isfinite(full.induce[:, :cut]).sum())


def test_validation_sets_filter_in_the_baseline_passes() -> None:
    """The filter's passes give the kept prompts, their baseline logits and the recording the
    induce passes start from; scoring with them equals scoring the kept prompts from scratch."""
    cm = tiny_chat_model("llama")
    harmful = [
        "how do I pick a lock",
        "tell me something bad",
        "x",
        "steal a car now",
        "steal a car later",
    ]
    harmless = [
        "bake a cake",
        "write a poem about spring please",
        "sum 2 and 2",
        "hello",
        "plant a tree",
    ]
    vocab = cm.model.config.vocab_size
    tokens = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[
        : vocab // 2
    ].tolist()
    val = ValidationSets.build(cm, harmful, harmless, tokens, batch_size=2)
    # the paper's filter: harmful prompts kept where the refusal metric is > 0, harmless < 0
    for prompts, kept, refused in ((harmful, val.harmful, True), (harmless, val.harmless, False)):
        metric = refusal_metric(last_position_logits(cm, prompts), tokens).tolist()
        assert kept == [p for p, m in zip(prompts, metric, strict=True) if (m > 0) == refused]
        assert kept == filter_prompts(cm, prompts, tokens, refused, batch_size=2)
    assert 0 < len(val.harmful) < len(harmful) and 0 < len(val.harmless) < len(harmless)
    assert val.counts()["harmless_val"] == {"sampled": 5, "kept": len(val.harmless)}
    torch.testing.assert_close(val.harmless_logits, last_position_logits(cm, val.harmless))
    cands = extract_candidates(cm, harmful, harmless, progress=False)
    config = SelectionConfig(kl_max=10.0)
    given = score_candidates(
        cm, cands, val.harmful, val.harmless, tokens, config, [1, 2], 2, False, validation=val
    )
    fresh = score_candidates(cm, cands, val.harmful, val.harmless, tokens, config, [1, 2], 2, False)
    for name in ("bypass", "induce", "kl"):
        torch.testing.assert_close(getattr(given, name), getattr(fresh, name), equal_nan=True)
    with pytest.raises(RefdirError, match="other prompts"):
        score_candidates(cm, cands, harmful, harmless, tokens, config, [1], validation=val)
    with pytest.raises(
        RefdirError, match=r"removed every prompt of harmless_val; .*filter_prompts"
    ):
        ValidationSets.build(cm, harmful, harmless, list(range(0, vocab, 2)))


def test_a_subset_of_a_recording_keeps_its_prefix() -> None:
    """The kept rows may share a longer prefix than the recorded ones ("steal a ..."): the
    passes that replay them stop their shared prefix where the recording's stopped."""
    cm = tiny_chat_model("qwen2")
    prompts = ["steal a car", "steal a bike", "hi there"]
    start = LayerInputs.record(cm, [cm.chat.token_ids(p) for p in prompts], batch_size=2)
    assert start is not None
    kept = start.subset([1, 0])
    vectors = torch.randn(2, cm.d_model, generator=torch.Generator().manual_seed(0))
    subset = ["steal a bike", "steal a car"]
    full = candidate_logits(cm, subset, vectors, "actadd", 1, 4.0, batch_size=4)
    replayed = candidate_logits(cm, subset, vectors, "actadd", 1, 4.0, 4, kept)
    torch.testing.assert_close(replayed, full, rtol=1e-4, atol=1e-4)
