"""`refdir optimize` on tiny models: the search, its storage (resume, two workers), the
front and its pick rules, the kernel, the export's parity with the edit's hooks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from refdir.artifacts.export import ExportManifest
from refdir.artifacts.pareto import FrontPoint, HeldoutRecord, ParetoRecord
from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.model.generation import last_position_logits
from refdir.optimize.config import OptimizeConfig
from refdir.optimize.front import fill_next, knee, pick, refine_next
from refdir.optimize.run import optimize
from refdir.optimize.space import kernel
from tiny import TINY_RUN, tiny_chat_model

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(SRC), str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p
    ),
    "OMP_NUM_THREADS": "1",
}
CLI = [sys.executable, "-c", "from refdir.cli import entry; entry()"]

CONFIG = OptimizeConfig.model_validate(
    {**TINY_RUN.model_dump(), "trials": 6, "n_front": 3, "n_subspace": 4, "long_tokens": 3}
)


def test_kernel_shape() -> None:
    w = kernel(9, peak=1.2, center=4.0, width=2.0, edge=0.5)
    assert w == pytest.approx((0, 0, 0.6, 0.9, 1.2, 0.9, 0.6, 0, 0))
    flat = kernel(5, peak=1.0, center=0.0, width=5.0, edge=1.0)
    assert flat == (1.0,) * 5  # the paper's edit: weight 1 everywhere
    assert kernel(3, peak=1.0, center=1.5, width=1.0, edge=0.0) == pytest.approx((0, 0.5, 0.5))
    with pytest.raises(RefdirError, match="width must be positive"):
        kernel(3, 1.0, 1.0, 0.0, 0.5)


def test_optimize_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "opt"
    record = optimize(CONFIG, out, progress=False, model=tiny_chat_model("llama"))
    assert record.trials == 6
    assert ParetoRecord.read(out).model_dump() == record.model_dump()
    assert record.points and 0 <= record.chosen < len(record.points)
    kls = [p.kl for p in record.points]
    assert kls == sorted(kls)
    # the front: no point dominates another by the search's objectives
    for a in record.points:
        for b in record.points:
            assert not (
                (a.kl, a.refusal_score) != (b.kl, b.refusal_score)
                and a.kl <= b.kl
                and a.refusal_score <= b.refusal_score
            )
    assert record.paper.label == "paper" and record.paper.refusal_generated is not None
    held = HeldoutRecord.read(out)
    assert [r.label for r in held.results] == ["none", "paper", "chosen"]
    assert held.results[0].kl_mean == pytest.approx(0.0, abs=1e-9)
    assert (out / "figures" / "pareto.png").stat().st_size > 1000
    assert "| paper |" in (out / "optimize.md").read_text()
    fronts = sorted(p.name for p in (out / "front").iterdir())
    assert fronts == [*(f"{i:02d}" for i in range(len(record.points))), "paper"]
    assert (
        Edit.load(out / "front" / f"{record.chosen:02d}").params
        == record.points[record.chosen].params
    )
    # the export equals the chosen edit by hooks
    manifest = ExportManifest.read(out / "best")
    assert manifest.exact and manifest.parity_max_abs_logit_delta < 1e-4
    edit = Edit.load(out / "best")
    base = tiny_chat_model("llama")
    prompts = ["hi", "write a poem"]
    with edit.apply(base):
        hooked = last_position_logits(base, prompts)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "best")
    batch = base.chat.encode(prompts)
    with torch.no_grad():
        logits = exported(**batch.inputs()).logits[:, -1].float()
    torch.testing.assert_close(logits, hooked, rtol=0, atol=1e-4)


def _point(kl: float, rate: float, score: float | None = None) -> FrontPoint:
    return FrontPoint(
        trial=0,
        label="t",
        params={},
        refusal_score=rate if score is None else score,
        refusal_first_token=rate,
        kl=kl,
        refusal_generated=rate,
        ce_text=None,
    )


def test_the_rule_point_is_bisected_between_spread_points() -> None:
    """With --max-refusal, the front points between the last spread point that misses the rate
    and the first that meets it are bisected by KL until the least-KL point that meets it is
    found; with --max-kl, the front point of largest KL within the bound is confirmed; the knee
    needs none."""
    kls = [0.01 * (i + 1) for i in range(20)]  # trial i at KL 0.01 (i + 1)
    spots = list(enumerate(kls))
    rate = [max(0.0, 0.5 - 0.05 * i) for i in range(20)]  # meets 0.02 from trial 10 on

    def confirmed_as(numbers: list[int]) -> dict[int, FrontPoint]:
        return {n: _point(kls[n], rate[n]) for n in numbers}

    done = [0, 19]  # the spread: both ends
    while (n := refine_next(spots, confirmed_as(done), None, 0.02)) is not None:
        assert n not in done and kls[n] < min(kls[d] for d in done if rate[d] <= 0.02)
        done.append(n)
    assert len(done) - 2 <= 5  # bisection: about log2(18) confirmations
    chosen, _ = pick(list(confirmed_as(sorted(done)).values()), None, 0.02)
    assert sorted(done)[chosen] == 10  # the least-KL point that meets the rate
    # no confirmed point meets the rate: nothing to bisect towards
    assert refine_next(spots, confirmed_as([0, 5]), None, 0.02) is None
    # --max-kl: the largest KL within the bound, once
    assert refine_next(spots, confirmed_as([0, 19]), 0.075, None) == 6
    assert refine_next(spots, confirmed_as([0, 6, 19]), 0.075, None) is None
    assert refine_next(spots, confirmed_as([0, 19]), None, None) is None


def test_pick_rules() -> None:
    points = [_point(0.01, 0.9), _point(0.03, 0.3), _point(0.05, 0.02), _point(0.2, 0.0)]
    assert pick(points, None, None) == (knee(points), "the knee of the front")
    assert knee(points) == 2
    assert pick(points, 0.04, None)[0] == 1
    # the same count of generated refusals within the KL bound: the lower cheap score wins,
    # not the lower KL (25 prompts cannot tell 0.02 from 0.04; the score can)
    tied = [_point(0.01, 0.04, 0.03), _point(0.02, 0.04, 0.01), _point(0.03, 0.04, 0.02)]
    assert pick(tied, 0.05, None)[0] == 1
    assert pick(tied, 0.015, None)[0] == 0
    assert pick(points, None, 0.02)[0] == 2
    assert pick(points, None, 0.0)[0] == 3
    with pytest.raises(RefdirError, match=r"no front point has KL <= 0\.001"):
        pick(points, 0.001, None)
    with pytest.raises(RefdirError, match="not both"):
        pick(points, 0.1, 0.1)


OPTIONS = [
    *("--refusal-tokens", "5,6", "--no-filter", "--seed", "1", "--n-train", "6", "--n-val", "6"),
    *("--fallback-kl", "1,1e9", "--induce-min=-1e9", "--max-new-tokens", "2", "--n-ce", "2"),
    *("--n-front", "2", "--n-subspace", "4", "--no-heldout", "--no-export"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model("qwen2", initializer_range=0.2).save_pretrained(path)  # edits that move it
    tiny_tokenizer().save_pretrained(path)
    return path


def _study(storage: Path) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(
        study_name="refdir-optimize", storage=JournalStorage(JournalFileBackend(str(storage)))
    )


def _complete(storage: Path) -> list[Any]:
    from optuna.trial import TrialState

    return _study(storage).get_trials(states=(TrialState.COMPLETE,))


def test_two_workers_share_one_study_and_a_later_command_adds_to_it(
    model_dir: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "shared-journal.log"
    args = lambda out, n: [  # noqa: E731
        *CLI,
        "optimize",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--trials",
        str(n),
        "--storage",
        str(storage),
        *OPTIONS,
    ]

    def start(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            args(tmp_path / name, 16), env=ENV, stderr=subprocess.PIPE, text=True
        )

    def trials_of(worker: subprocess.Popen[str]) -> int:
        if not storage.exists():
            return 0
        try:
            return sum(
                t.user_attrs["worker"].endswith(f":{worker.pid}") for t in _complete(storage)
            )
        except KeyError:  # the study is being made
            return 0

    def until(condition: Any) -> None:
        deadline = time.monotonic() + 240
        while not condition():
            assert time.monotonic() < deadline, "the workers made no progress"
            time.sleep(0.2)

    def hold(worker: subprocess.Popen[str]) -> None:
        """Stop ``worker`` at a moment it does not hold the journal's lock (stopped while
        holding it, the other worker would wait for it and then break it)."""
        lock = storage.with_name(storage.name + ".lock")
        while True:
            worker.send_signal(signal.SIGSTOP)
            if not lock.exists():
                return
            worker.send_signal(signal.SIGCONT)
            time.sleep(0.05)

    # both take part whatever the machine's load: a is held once it has a trial, until b has one
    first = start("a")
    until(lambda: trials_of(first) > 0)
    hold(first)
    try:
        second = start("b")
        until(lambda: trials_of(second) > 0)
    finally:
        first.send_signal(signal.SIGCONT)
    workers = [first, second]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    trials = _complete(storage)
    assert 16 <= len(trials) <= 17  # each worker stops once the study holds 16
    by_worker = {t.user_attrs["worker"] for t in trials}
    assert len(by_worker) == 2, by_worker  # both workers ran trials of the one study
    assert ParetoRecord.read(tmp_path / "a").trials >= 16
    # the same command again adds nothing; a larger --trials adds the difference
    again = subprocess.run(args(tmp_path / "a", 16), env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert len(_complete(storage)) == len(trials)
    assert ParetoRecord.read(tmp_path / "a").search_seconds == 0.0
    assert "this command added no trials" in (tmp_path / "a" / "optimize.md").read_text()
    more = subprocess.run(
        args(tmp_path / "a", len(trials) + 3), env=ENV, capture_output=True, text=True
    )
    assert more.returncode == 0, more.stderr
    assert len(_complete(storage)) == len(trials) + 3


def test_a_study_of_another_search_is_refused(model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from refdir.cli import app

    base = ["optimize", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--trials", "2"]
    first = CliRunner().invoke(app, [*base, *OPTIONS])
    assert first.exit_code == 0, first.output
    assert len(_complete(tmp_path / "o" / "optuna-journal.log")) == 2
    other = CliRunner().invoke(app, [*base, *OPTIONS, "--methods", "weights"])
    assert other.exit_code == 2
    assert "searches something else (methods=" in other.stderr


def test_directions_start_at_the_first_layer_whose_candidate_is_not_zero() -> None:
    from refdir.directions.candidates import Candidates
    from refdir.optimize.sources import DirectionSources

    g = torch.Generator().manual_seed(0)
    harmful = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    harmless = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    harmless[:, 0] = harmful[:, 0]  # the first layer's input: the same token for every prompt
    sources = DirectionSources(Candidates(harmful, harmless, "m"), -1)
    assert sources.first_layer == 1
    with pytest.raises(RefdirError, match=r"outside 1\.\.4"):
        sources.direction(0.5)
    d = harmful[-1] - harmless[-1]
    mid = sources.direction(1.25)
    unit = [v / v.norm() for v in (d[1], d[2])]
    expected = 0.75 * unit[0] + 0.25 * unit[1]
    torch.testing.assert_close(mid, expected / expected.norm())
    projected = sources.direction(2.0, projected=True)
    assert float(projected @ harmless[-1, 2]) == pytest.approx(0.0, abs=1e-9)
    basis = sources.basis(2.0, k=1)
    assert basis.shape == (1, 8)


def test_the_export_and_its_edit_by_hooks_agree_through_evaluate(
    model_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from refdir.cli import app

    out = tmp_path / "o"
    options = [o for o in OPTIONS if o != "--no-export"]
    made = CliRunner().invoke(
        app, ["optimize", "--model", str(model_dir), "--out", str(out), "--trials", "3", *options]
    )
    assert made.exit_code == 0, made.output
    best = out / "best"

    def evaluate(*args: str) -> dict[str, Any]:
        common = ["--prompts", "harmless_test", "--n", "4", "--max-new-tokens", "2", "--json"]
        result = CliRunner().invoke(app, ["evaluate", *args, *common])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    hooks = evaluate("--model", str(model_dir), "--edit", str(best), "--reference", str(model_dir))
    weights = evaluate("--model", str(best), "--reference", str(model_dir))
    same = evaluate("--model", str(model_dir), "--edit", str(best), "--reference", str(best))
    assert hooks["intervention"] == "edit"
    assert hooks["kl_reference"] == pytest.approx(weights["kl_reference"], rel=1e-3, abs=1e-7)
    assert weights["kl_reference"] > 1e-5  # the edit changes the model
    assert same["kl_reference"] < 1e-6  # the edit by hooks is the exported model
    both = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            str(model_dir),
            "--edit",
            str(best),
            "--intervention",
            "ablate",
            "--direction",
            str(best),
        ],
    )
    assert both.exit_code == 2 and "are two interventions; give one of them" in both.stderr


def test_a_study_starts_from_the_paper_edit_and_its_partial_strengths(tmp_path: Path) -> None:
    from refdir.optimize.search import Search, open_study
    from refdir.optimize.space import STRENGTHS, edit_of, paper_params

    search = Search("m", ("weights", "projected"), -1, 4, 2)
    study, _ = open_study(search, tmp_path, None, 0)
    queued = [t.system_attrs["fixed_params"] for t in study.trials]
    assert queued[0] == paper_params(2, search.methods, 4)
    assert [q["attn_peak"] for q in queued[1:]] == list(STRENGTHS)
    for q, strength in zip(queued[1:], STRENGTHS, strict=True):
        assert q["mlp_peak"] == q["embed"] == strength and q["index"] == 2.0
        assert q["projected"] is False
    # the partial strengths scale the paper's weights everywhere
    from refdir.directions.candidates import Candidates
    from refdir.optimize.sources import DirectionSources

    g = torch.Generator().manual_seed(0)
    cands = Candidates(
        torch.randn(1, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(1, 5, 8, generator=g, dtype=torch.float64),
        "m",
    )
    edit = edit_of(queued[2], DirectionSources(cands, -1))
    assert edit.attn == edit.mlp == (0.5,) * 4 and edit.embed == 0.5
    # a command that joins the study queues none of them again
    again, _ = open_study(search, tmp_path, None, 0)
    assert len(again.trials) == len(queued)
    # without per-layer weights the paper's edit is the only start
    (tmp_path / "b").mkdir()
    alone, _ = open_study(Search("m", ("projected",), -1, 4, 2), tmp_path / "b", None, 0)
    assert len(alone.trials) == 1
    # with the cone, each start again with the cone of one in place of the direction
    (tmp_path / "c").mkdir()
    coned, _ = open_study(Search("m", ("weights", "cone"), -1, 4, 2), tmp_path / "c", None, 0)
    starts = [t.system_attrs["fixed_params"] for t in coned.trials]
    assert [s["cone"] for s in starts] == [False] * 4 + [True] * 4
    assert [s["attn_peak"] for s in starts] == [1.0, *STRENGTHS] * 2
    # with per-layer directions, each start again with them (cone starts after)
    (tmp_path / "d").mkdir()
    both, _ = open_study(
        Search("m", ("weights", "layers", "cone"), -1, 4, 2), tmp_path / "d", None, 0
    )
    starts = [t.system_attrs["fixed_params"] for t in both.trials]
    assert [s["layers"] for s in starts] == [False] * 4 + [True] * 4 + [False] * 4
    assert [s["cone"] for s in starts] == [False] * 8 + [True] * 4


def test_the_switches_are_drawn_at_random_after_the_starts(tmp_path: Path) -> None:
    """The starting trials leave every switch but the cone off; the trials after them are
    random for a while (the sampler's model would otherwise begin from the starts alone), so
    each switch is tried both ways before the sampler narrows the search."""
    from refdir.optimize.search import RANDOM_TRIALS, Search, open_study
    from refdir.optimize.space import start_params, suggest

    methods = ("weights", "projected", "norm", "layers", "cone")
    search = Search("m", methods, -1, 4, 2)
    study, _ = open_study(search, tmp_path, None, 0)
    n_starts = len(start_params(2, methods, 4))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = suggest(trial, methods, 4)
        good = not params["projected"] and not params["layers"]  # what the starts favour
        return (0.0, 0.0) if good else (1.0, 1.0)

    study.optimize(objective, n_trials=n_starts + RANDOM_TRIALS)
    drawn = [t.params for t in study.trials[n_starts:]]
    for switch in ("projected", "norm", "layers", "cone"):
        assert {p[switch] for p in drawn} == {False, True}, switch


def test_per_layer_directions_are_each_layers_candidate() -> None:
    """With ``layers``, layer l's writes lose the candidate where they land (the residual after
    layer l), projected off the harmless mean there when ``projected``; the edit's own basis
    (the embedding's, and activation addition's) stays the direction at ``index``."""
    from refdir.directions.candidates import Candidates
    from refdir.optimize.sources import DirectionSources
    from refdir.optimize.space import edit_of, paper_params

    g = torch.Generator().manual_seed(0)
    diffs = torch.randn(1, 5, 8, generator=g, dtype=torch.float64)
    diffs[0, 0] = 0.0  # the first layer's input: the same token for every prompt
    cands = Candidates(diffs, torch.randn(1, 5, 8, generator=g, dtype=torch.float64), "m")
    sources = DirectionSources(cands, -1)
    params = {**paper_params(2, ("weights", "projected", "layers"), 4), "layers": True}
    for projected in (False, True):
        edit = edit_of({**params, "projected": projected}, sources)
        assert edit.layer_basis is not None and edit.layer_basis.shape == (4, 1, 8)
        for layer in range(4):
            want = sources.direction(float(layer + 1), projected).float()
            torch.testing.assert_close(edit.layer_basis[layer, 0], want)
            if projected:
                mean = cands.harmless_mean[-1, layer + 1].float()
                assert abs(float(edit.layer_basis[layer, 0] @ mean)) < 1e-4 * float(mean.norm())
        torch.testing.assert_close(edit.basis[0], sources.direction(2.0, projected).float())
    assert edit_of({**params, "layers": False}, sources).layer_basis is None
    # the cone, where searched, takes the place of both
    sources.cone = lambda k: edit.basis
    coned = edit_of({**params, "cone": True}, sources)
    assert coned.layer_basis is None


def test_the_steep_part_of_the_front_is_filled() -> None:
    """Where neighbouring confirmed points' generated rates differ by more than the step, the
    front trials between them are bisected by KL, the widest drop first, until every drop is
    at most the step or has no trial between its points."""
    kls = [0.01 * (i + 1) for i in range(21)]
    spots = list(enumerate(kls))
    rate = [1.0 if i < 8 else 0.0 if i > 12 else 1.0 - 0.2 * (i - 7) for i in range(21)]

    def confirmed_as(numbers: list[int]) -> dict[int, FrontPoint]:
        return {n: _point(kls[n], rate[n]) for n in numbers}

    done = [0, 10, 20]  # a spread that jumps over the steep part (trials 8..12)
    first = fill_next(spots, confirmed_as(done), 0.06)
    assert first is not None and 0 < first < 10  # the drop 1.0 -> 0.6 is the wider one
    while (n := fill_next(spots, confirmed_as(done), 0.06)) is not None:
        assert n not in done
        done.append(n)
    assert set(range(8, 13)) <= set(done)  # each step of 0.2 on the steep part is confirmed
    # the flat parts only as bisection passes through them (about log2 of their length)
    assert len(set(done) & set(range(1, 7))) <= 3
    assert len(set(done) & set(range(14, 20))) <= 3
    assert fill_next(spots, confirmed_as([0, 20]), 1.0) is None  # no drop above the step


def test_the_search_scores_the_forms_of_refusal_of_the_partly_edited_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every first token that starts at least MIN_COUNT refusals under the partial edits is
    scored beside the run's tokens; the study keeps them, and a later command reads them
    from it instead of finding them again."""
    from collections import Counter

    import refdir.directions.refusal_tokens as refusal_tokens
    import refdir.optimize.tokens as tokens
    from refdir.directions.candidates import Candidates
    from refdir.model.generation import generate_ids
    from refdir.optimize.search import Search, open_study
    from refdir.optimize.sources import DirectionSources
    from refdir.optimize.space import edit_of, start_params

    cm = tiny_chat_model("llama")
    g = torch.Generator().manual_seed(0)
    d = cm.model.config.hidden_size
    cands = Candidates(
        torch.randn(1, cm.n_layers + 1, d, generator=g, dtype=torch.float64) * 3,
        torch.zeros(1, cm.n_layers + 1, d, dtype=torch.float64),
        "m",
    )
    sources = DirectionSources(cands, -1)
    edits = [edit_of(p, sources) for p in start_params(1, ("weights",), cm.n_layers)[1:]]
    prompts = [f"prompt number {i}" for i in range(12)]
    # every completion stands for a refusal here (markers are tested on their own)
    monkeypatch.setattr(refusal_tokens, "is_refusal", lambda text: True)
    rows = [cm.chat.token_ids(p) for p in prompts]
    counts: Counter[int] = Counter()
    for edit in edits:
        with edit.apply(cm):
            counts.update(ids[0] for ids in generate_ids(cm, rows, 3, 8, False))
    run = [5]
    found = tokens.refusal_forms(cm, prompts, run, edits, 8, False)
    expected = run + [t for t, n in counts.most_common() if n >= tokens.MIN_COUNT and t not in run]
    assert list(found.ids) == expected[: tokens.MAX_TOKENS]
    assert found.added and len(found.added) == len(found.ids) - 1
    assert all(counts[t] >= tokens.MIN_COUNT for t in found.ids[1:])
    once = [t for t, n in counts.items() if n == 1]
    assert not set(once) & set(found.ids)
    # a token that starts more answers than refusals is not scored: here a completion's text
    # is its first id and its number, and the most common added token starts a refusal only
    # in every third completion
    common = found.ids[1]
    assert counts[common] >= 3 * tokens.MIN_COUNT
    numbered = iter(range(10**6))
    monkeypatch.setattr(
        refusal_tokens,
        "answer_texts",
        lambda cm, answers: [f"{a[0]} {next(numbered)}" for a in answers],
    )

    def refused(text: str) -> bool:
        first, number = text.split()
        return int(first) != common or int(number) % 3 == 0

    monkeypatch.setattr(refusal_tokens, "is_refusal", refused)
    assert list(tokens.refusal_forms(cm, prompts, run, edits, 8, False).ids) == [
        t for t in found.ids if t != common
    ]
    monkeypatch.setattr(
        refusal_tokens, "is_refusal", lambda text: False
    )  # no refusal: the run's alone
    assert list(tokens.refusal_forms(cm, prompts, run, edits, 8, False).ids) == run

    study, _ = open_study(Search("m", ("weights",), -1, cm.n_layers, 1), tmp_path, None, 0)
    assert tokens.study_tokens(study, run, lambda: found) == list(found.ids)
    again, _ = open_study(Search("m", ("weights",), -1, cm.n_layers, 1), tmp_path, None, 0)

    def not_again() -> tokens.SearchTokens:
        raise AssertionError("found again")

    assert tokens.study_tokens(again, run, not_again) == list(found.ids)
    # the user's own tokens (nothing to find) are scored as they are
    (tmp_path / "fixed").mkdir()
    fixed, _ = open_study(
        Search("m", ("weights",), -1, cm.n_layers, 1), tmp_path / "fixed", None, 0
    )
    assert tokens.study_tokens(fixed, run, None) == run
    assert fixed.user_attrs[tokens.TOKENS_ATTR] == run
    # a study that holds trials scored before it kept any tokens goes on with the run's
    (tmp_path / "older").mkdir()
    older, _ = open_study(
        Search("m", ("weights",), -1, cm.n_layers, 1), tmp_path / "older", None, 0
    )
    older.optimize(lambda trial: (0.5, 0.5), n_trials=1)
    assert tokens.study_tokens(older, run, not_again) == run
