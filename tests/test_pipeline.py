from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import refdir.study.plan
import refdir.study.steps.evaluate
import refdir.study.steps.select
from refdir.artifacts.run import Completion, ConfigRecord, Numerics
from refdir.artifacts.selection import SelectionRecord
from refdir.data import load_corpus
from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.kl import kl_last_position, random_direction_kl
from refdir.evaluation.losses import ce_loss
from refdir.interventions.intervention import NONE, Intervention
from refdir.measures import is_refusal
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate
from refdir.study.config import RunConfig
from refdir.study.plan import STEPS
from refdir.study.run import run_pipeline
from refdir.study.steps.shared import eval_prompts
from tiny import TINY_RUN as CONFIG
from tiny import tiny_chat_model, tiny_model, tiny_tokenizer


def test_pipeline_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    done = run_pipeline(CONFIG, tmp_path, progress=False, model=cm)
    assert list(done) == [
        "prompts",
        "extract",
        "select",
        "evaluate",
        "report",
    ]  # no suffix unless asked
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("baseline", "ablation", "actadd"):
        assert 0.0 <= metrics["harmful"]["refusal_score"][key] <= 1.0
        assert metrics["ce_loss"][key] > 0
    assert set(metrics["harmless"]["refusal_score"]) == {"baseline", "actadd", "ablation"}
    long = metrics["harmful"]["refusal_score_long"]
    assert long["max_new_tokens"] == 4 and 0.0 <= long["ablation"] <= 1.0
    assert set(long["by_set"]) == {"jailbreakbench", "harmful_test"}
    lines = (tmp_path / "completions" / "harmful.ablation_long.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 2 + 2 harmful prompts, generated at 4 tokens
    # JailbreakBench has categories: one row per category of the sampled prompts
    categories = metrics["harmful"]["by_category"]["jailbreakbench"]
    assert 1 <= len(categories) <= 2 and "harmful_test" in metrics["harmful"]["by_category"]
    assert metrics["protocol"] == "refdir" and metrics["ce_corpus"] == "prose"
    assert metrics["harmless"]["kl_ablation"] >= 0
    assert "kl_random_directions" not in metrics["harmless"]  # only when asked
    spread = metrics["harmless"]["kl_ablation_spread"]
    groups = [spread["refused_at_baseline"], spread["answered_at_baseline"]]
    assert sum(g["n"] for g in groups) == sum(metrics["sizes"]["harmless_eval"].values())
    pooled = sum(g["n"] * g["mean"] for g in groups if g["n"]) / sum(g["n"] for g in groups)
    assert pooled == pytest.approx(metrics["harmless"]["kl_ablation"], abs=1e-4)
    assert 0 <= spread["median"] <= spread["p90"] <= spread["max"]
    assert metrics["sizes"]["harmful_eval"] == {"jailbreakbench": 2, "harmful_test": 2}
    prompts = json.loads((tmp_path / "prompts.json").read_text())
    cands = Candidates.load(tmp_path / "candidates.safetensors")
    assert cands.harmful_prompts == prompts["harmful_train"]  # the filter is off here
    for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
        n = len(prompts[name])
        assert metrics["sizes"][name] == n
        assert metrics["sizes"]["filter"][name] == {"sampled": n, "kept": n}
    assert set(metrics["timings"]) == set(done)
    parts = metrics["timing_parts"]  # where each step's time went
    assert set(parts) == {"select", "evaluate"}
    assert (
        {"baselines", "induce"} <= set(parts["select"]) <= {"baselines", "induce", "kl", "bypass"}
    )
    assert list(parts["evaluate"]) == ["completions", "ce text", "ce and kl on own completions"]
    for step, by_part in parts.items():
        assert all(t >= 0 for t in by_part.values())
        assert sum(by_part.values()) <= metrics["timings"][step] + 0.01 * len(by_part)
    assert json.loads((tmp_path / "timings.json").read_text())["parts"]["select"] == parts["select"]
    assert "| · induce |" in (tmp_path / "report.md").read_text()
    # the device of each step that ran the model (the report runs none)
    assert metrics["timing_devices"] == dict.fromkeys(
        ["prompts", "extract", "select", "evaluate"], "cpu"
    )
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert metrics["direction"]["layer"] == selection["chosen"]["layer"] < 0.8 * cm.n_layers
    assert all(v is None for v in [row[0] for row in selection["bypass"]])  # layer 0 skipped
    assert (tmp_path / "report.html").exists() and (tmp_path / "report.md").exists()
    assert "row below it" not in (tmp_path / "report.md").read_text()  # no random directions
    assert len(list((tmp_path / "completions").glob("*.jsonl"))) == 7
    check_figures(cm, tmp_path, metrics)
    # a second run skips everything
    assert run_pipeline(CONFIG, tmp_path, progress=False, model=cm) == {}
    # redoing the report keeps the parts of the steps it did not redo
    run_pipeline(CONFIG, tmp_path, force="report", progress=False, model=cm)
    assert json.loads((tmp_path / "metrics.json").read_text())["timing_parts"] == parts


def check_figures(cm: ChatModel, out: Path, metrics: dict[str, Any]) -> None:
    """metrics.json and the completion files hold what the chosen direction does to the held-out
    prompts, recomputed here with scoped interventions: each condition's completions, their
    refusal flags and rates, the CE loss on the corpus and the KL of ablation."""
    direction = Direction.load(out)
    assert (direction.layer, direction.position) == (
        metrics["direction"]["layer"],
        metrics["direction"]["position"],
    )
    _, harmful, harmless = eval_prompts(CONFIG)
    texts = load_corpus(CONFIG.ce_corpus, CONFIG.n_ce)
    ablation = Intervention.ablation(direction)
    conditions = {
        ("harmful", "baseline"): (harmful, NONE),
        ("harmful", "ablation"): (harmful, ablation),
        ("harmful", "actadd"): (harmful, Intervention.addition(direction, CONFIG.harmful_coeff)),
        ("harmless", "baseline"): (harmless, NONE),
        ("harmless", "actadd"): (harmless, Intervention.addition(direction, CONFIG.harmless_coeff)),
    }
    for (group, name), (prompts, condition) in conditions.items():
        lines = (out / "completions" / f"{group}.{name}.jsonl").read_text().splitlines()
        rows = [Completion.model_validate_json(line) for line in lines]
        assert [r.prompt for r in rows] == prompts
        assert all(r.refusal == is_refusal(r.completion) for r in rows)
        rate = round(sum(r.refusal for r in rows) / len(rows), 4)
        assert metrics[group]["refusal_score"][name] == rate
        with condition.apply(cm):
            completions = generate(cm, prompts, CONFIG.max_new_tokens, progress=False)
            assert [r.completion for r in rows] == completions, (group, name)
            if group == "harmful":  # the CE loss's conditions are the harmful ones
                ce = ce_loss(cm, texts, progress=False)
                assert metrics["ce_loss"][name] == pytest.approx(ce, abs=2e-5)
    kl = kl_last_position(cm, harmless, ablation)
    assert metrics["harmless"]["kl_ablation"] == pytest.approx(kl, abs=2e-5, rel=1e-3)
    assert len({metrics["ce_loss"][c] for c in ("baseline", "ablation", "actadd")}) == 3


def test_random_directions_give_the_kl_a_reference(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    config = CONFIG.model_copy(update={"n_random_kl": 3})
    run_pipeline(config, tmp_path, progress=False, model=cm)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    reference = metrics["harmless"]["kl_random_directions"]
    assert reference["n"] == 3 and reference["seed"] == config.seed
    assert 0 <= reference["min"] <= reference["p10"] <= reference["median"] <= reference["p90"]
    assert reference["p90"] <= reference["max"]
    # the KL scores of the seeded random directions on the held-out harmless prompts
    _, _, harmless = eval_prompts(config)
    kl = random_direction_kl(cm, harmless, 3, config.seed, progress=False).sort().values.tolist()
    got = [reference["min"], reference["median"], reference["max"]]
    assert got == pytest.approx(kl, abs=2e-5, rel=1e-3)
    assert len(set(got)) == 3
    chosen = metrics["harmless"]["kl_ablation"]
    assert reference["below_chosen"] == round(sum(k < chosen for k in kl) / 3, 4)
    report = (tmp_path / "report.md").read_text()
    assert "Ablating 3 random directions instead (seed 1)" in report
    assert "| the same, median of 3 random directions |" in report
    assert "ablated, and the row below it the same for random directions." in report


def test_a_model_that_answers_nothing_still_gets_its_kl_and_text_ce(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    # every token ends the answer: every completion is empty, no own-completion token to score
    cm.model.generation_config.eos_token_id = list(range(cm.model.config.vocab_size))
    run_pipeline(CONFIG, tmp_path, progress=False, model=cm)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ce_loss_own_completions"] is None
    _, _, harmless = eval_prompts(CONFIG)
    direction = Direction.load(tmp_path)
    kl = kl_last_position(cm, harmless, Intervention.ablation(direction))
    assert metrics["harmless"]["kl_ablation"] == pytest.approx(kl, abs=2e-5, rel=1e-3)
    assert math.isfinite(metrics["ce_loss"]["ablation"])
    report = (tmp_path / "report.md").read_text()
    assert "Every baseline completion of a harmless prompt was empty" in report


def test_a_judge_scores_the_harmful_completions(tmp_path: Path) -> None:
    from refdir.evaluation.judges import llamaguard, safety_score

    judge_dir = tmp_path / "judge"
    tiny_model("llama", seed=3).save_pretrained(judge_dir)
    tiny_tokenizer().save_pretrained(judge_dir)
    config = CONFIG.model_copy(update={"judge": "llamaguard", "judge_model": str(judge_dir)})
    out = tmp_path / "run"
    run_pipeline(config, out, progress=False, model=tiny_chat_model("llama"), until="evaluate")
    metrics = json.loads((out / "metrics.json").read_text())
    judge = llamaguard(str(judge_dir), progress=False)
    for condition in ("baseline", "ablation", "actadd"):
        rows = [
            json.loads(line)
            for line in (out / "completions" / f"harmful.{condition}.jsonl")
            .read_text()
            .splitlines()
        ]
        expected = safety_score(judge, [r["prompt"] for r in rows], [r["completion"] for r in rows])
        assert metrics["harmful"]["safety_score"][condition] == round(expected, 4)
    assert "judge" in metrics["timing_parts"]["evaluate"]  # its model's loading is not counted
    assert metrics["timing_devices"] == dict.fromkeys(
        ["prompts", "extract", "select", "evaluate"], "cpu"
    )


class Killed(Exception):
    pass


def test_resume_after_an_interrupted_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cm = tiny_chat_model("llama")
    real = refdir.study.steps.evaluate.evaluate_jobs
    calls: list[list[str]] = []
    killed: list[bool] = []

    def flaky(cm: Any, jobs: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append([job.name for job in jobs])
        if not killed:
            killed.append(True)
            raise Killed  # the process dies while the evaluate step decodes
        return real(cm, jobs, *args, **kwargs)

    monkeypatch.setattr(refdir.study.steps.evaluate, "evaluate_jobs", flaky)
    with pytest.raises(Killed):
        run_pipeline(CONFIG, tmp_path, progress=False, model=cm)
    assert (tmp_path / "direction.safetensors").exists()
    assert not (tmp_path / "metrics.json").exists()
    assert not list((tmp_path / "completions").glob("*.jsonl"))  # nothing half-written
    calls.clear()
    done = run_pipeline(CONFIG, tmp_path, progress=False, model=cm)
    assert list(done) == ["evaluate", "report"]
    every = [
        "harmful.baseline",
        "harmless.baseline",
        "harmful.ablation",
        "harmful.actadd",
        "harmless.actadd",
        "harmless.ablation",
    ]
    # the earlier steps were reused; the completions of one length decode together
    assert calls == [every, ["harmful.ablation_long"]]
    parts = json.loads((tmp_path / "metrics.json").read_text())["timing_parts"]
    assert "induce" in parts["select"]  # timed by the first attempt, kept across the resume
    assert "completions" in parts["evaluate"]
    # one completion file lost: only its job is generated again, the others are read back
    harmless = (tmp_path / "completions" / "harmless.baseline.jsonl").read_text()
    (tmp_path / "completions" / "harmless.baseline.jsonl").unlink()
    (tmp_path / "metrics.json").unlink()
    calls.clear()
    run_pipeline(CONFIG, tmp_path, progress=False, model=cm, until="evaluate")
    assert calls == [["harmless.baseline"]]
    assert (tmp_path / "completions" / "harmless.baseline.jsonl").read_text() == harmless
    forced = run_pipeline(CONFIG, tmp_path, progress=False, model=cm, force="report")
    assert list(forced) == ["report"]


def test_when_nothing_passes_the_scores_are_kept_and_a_manual_pick_reuses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cm = tiny_chat_model("llama")
    strict = CONFIG.model_copy(update={"kl_max": -1.0, "fallback_kl_bounds": ()})
    with pytest.raises(RefdirError, match="no candidate passes"):
        run_pipeline(strict, tmp_path, progress=False, model=cm, until="select")
    kept = json.loads((tmp_path / "selection.json").read_text())
    assert kept["chosen"] is None and kept["rule"].startswith("none")
    assert kept["fallback"] is None and kept["n_passed"] == 0
    manual = strict.model_copy(update={"layer": 2, "position": -1})
    # in the same folder, as the error suggests: a new choice among the same scores
    monkeypatch.setattr(refdir.study.steps.select, "score_candidates", _never)
    assert set(run_pipeline(manual, tmp_path, progress=False, model=cm, until="select")) == {
        "select"
    }
    chosen = _strict_json(tmp_path / "selection.json")
    assert chosen["rule"].startswith("manual") and chosen["chosen"]["layer"] == 2
    assert chosen["n_passed"] == 0 and chosen["fallback"] is False  # the filter's view, kept
    assert chosen["n_candidates"] == sum(v is not None for row in kept["induce"] for v in row)
    # a candidate the pruned scoring left out has no scores: null, never NaN
    assert chosen["chosen"]["bypass"] is None or math.isfinite(chosen["chosen"]["bypass"])
    assert chosen["bypass"] == kept["bypass"]
    assert Direction.load(tmp_path).layer == 2
    run_pipeline(manual, tmp_path, progress=False, model=cm)  # the whole run, with that pick
    other = manual.model_copy(update={"layer": 1})
    done = run_pipeline(other, tmp_path, progress=False, model=cm)
    assert set(done) == {"select", "evaluate", "report"}  # the scores are kept
    assert Direction.load(tmp_path).layer == 1
    assert _strict_json(tmp_path / "metrics.json")["direction"]["layer"] == 1
    _strict_json(tmp_path / "direction.json")


def _strict_json(path: Path) -> Any:
    """The JSON in ``path``, failing on NaN or Infinity (not JSON)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the candidates were scored again")


def test_changed_options_are_refused_on_resume(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    run_pipeline(CONFIG, tmp_path, progress=False, model=cm, until="prompts")
    other = CONFIG.model_copy(update={"n_train": 5})
    with pytest.raises(RefdirError, match="other options \\(`n_train`\\)"):
        run_pipeline(other, tmp_path, progress=False, model=cm)
    # a folder written before an option existed resumes with that option at its default
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["options"]["score_all"]  # as if the folder predated --score-all
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert run_pipeline(CONFIG, tmp_path, progress=False, model=cm, until="prompts") == {}
    with pytest.raises(RefdirError, match="other options \\(`score_all`\\)"):
        run_pipeline(
            CONFIG.model_copy(update={"score_all": True}), tmp_path, progress=False, model=cm
        )
    with pytest.raises(RefdirError, match="unknown step"):
        run_pipeline(CONFIG, tmp_path, progress=False, model=cm, force="everything")


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"harmful_eval": ("harmful_tset",)}, "no such file or packaged set"),
        ({"harmful_eval": ()}, "`harmful_eval` names no set"),
        ({"harmless_train": "nope.json"}, "'nope.json': no such file"),
        ({"judge": "llamagaurd", "judge_model": "/x"}, "did you mean 'llamaguard'"),
        ({"judge": "llamaguard"}, "`judge` needs `judge_model`"),
        ({"judge_model": "/x"}, "no judge set"),
        ({"judge": "llamaguard", "judge_model": "/no/such/judge"}, "no such folder"),
    ],
)
def test_options_a_later_step_would_reject_fail_before_any_step(
    tmp_path: Path, update: dict[str, Any], message: str
) -> None:
    with pytest.raises(RefdirError, match=message) as err:
        run_pipeline(
            CONFIG.model_copy(update=update), tmp_path, progress=False, model=tiny_chat_model()
        )
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written, no step run


def test_a_coefficient_must_be_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        RunConfig(harmful_coeff=math.nan)


def test_suffix_step_adds_a_section_to_the_report(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    first = run_pipeline(CONFIG, tmp_path, progress=False, model=cm)
    assert (
        "suffix" not in first and "Adversarial suffix" not in (tmp_path / "report.html").read_text()
    )
    config = CONFIG.model_copy(
        update={"suffix": True, "suffix_steps": 1, "n_suffix_prompts": 2, "n_suffix_eval": 2}
    )
    # adding the suffix step to a finished run redoes only that step and the report
    done = run_pipeline(config, tmp_path, progress=False, model=cm)
    assert sorted(done) == ["monitor", "report", "suffix"]
    data = json.loads((tmp_path / "suffix" / "suffix.json").read_text())
    assert set(data["refusal_rate"]) >= {"without", "with", "random"}
    html = (tmp_path / "report.html").read_text()
    assert "Adversarial suffix" in html and 'src="suffix/' not in html
    assert "figures/suffix_projection.png" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "figures" / "suffix_projection.png").is_file()
    parts = json.loads((tmp_path / "metrics.json").read_text())["timing_parts"]
    assert list(parts["suffix"]) == ["search", "analysis"]
    assert set(parts) == {"select", "evaluate", "suffix"}  # the earlier steps' parts are kept


ALL_ARTIFACTS = [
    "config.json",
    "prompts.json",
    "selection.json",
    "direction.json",
    "direction.safetensors",
    "metrics.json",
    "benchmarks.json",
    "suffix/suffix.json",
    "report.html",
    "completions/x.baseline.jsonl",
]


@pytest.mark.parametrize(
    ("change", "removed"),
    [
        ({"harmless_coeff": 2.0}, {"metrics.json", "completions/x.baseline.jsonl"}),
        (
            {"max_new_tokens": 3},
            {"metrics.json", "completions/x.baseline.jsonl", "suffix/suffix.json"},
        ),
        ({"n_ce": 3}, {"metrics.json"}),
        ({"benchmark_limit": 5}, {"benchmarks.json"}),
        ({"suffix_steps": 2}, {"suffix/suffix.json"}),
        (
            {"layer": 1, "position": -1},
            {
                "direction.json",
                "direction.safetensors",
                "metrics.json",
                "completions/x.baseline.jsonl",
                "benchmarks.json",
                "suffix/suffix.json",
            },
        ),
    ],
)
def test_a_changed_option_removes_exactly_what_reads_it(
    tmp_path: Path, change: dict[str, Any], removed: set[str]
) -> None:
    config = CONFIG.model_copy(update={"suffix": True, "benchmarks": ("t.yaml",)})
    for name in ALL_ARTIFACTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    ConfigRecord(
        options=config.result_keys(),
        run=config.model_dump(mode="json"),
        local_model=False,
        versions={},
    ).write(tmp_path)
    _selection(positions=[-1], n_layers=3).write(tmp_path)
    numerics = Numerics(device="cpu", dtype="float32")
    refdir.study.plan.check_config(config.model_copy(update=change), tmp_path, len(STEPS), numerics)
    left = {name for name in ALL_ARTIFACTS if (tmp_path / name).exists()}
    assert left == set(ALL_ARTIFACTS) - removed - {"report.html"}


def _selection(positions: list[int], n_layers: int) -> SelectionRecord:
    """A selection.json of the given shape, every score null, nothing chosen."""
    grid: list[list[float | None]] = [[None] * n_layers for _ in positions]
    kept = {"sampled": 1, "kept": 1}
    return SelectionRecord.model_validate(
        {
            "positions": positions,
            "layers": list(range(n_layers)),
            "bypass": grid,
            "induce": grid,
            "kl": grid,
            "baseline": {"harmful_val": 1.0, "harmless_val": -1.0},
            "filters": {
                "kl_max": 0.1,
                "induce_min": 0.0,
                "max_layer_fraction": 0.8,
                "fallback_kl_bounds": [],
            },
            "rule": "none: test",
            "passed": [[False] * n_layers for _ in positions],
            "fallback": None,
            "n_candidates": 0,
            "n_passed": 0,
            "chosen": None,
            "validation": {
                "prompts": {"harmful_val": ["a"], "harmless_val": ["b"]},
                "filter": {"harmful_val": kept, "harmless_val": kept},
            },
        }
    )


def test_forcing_a_run_removes_the_results_of_steps_no_longer_asked_for(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    run_pipeline(CONFIG, tmp_path, progress=False, model=cm)
    (tmp_path / "benchmarks.json").write_text('{"scores": {"OLDTASK": {}}}')  # an older run's
    (tmp_path / "suffix").mkdir()
    (tmp_path / "suffix" / "suffix.json").write_text("{}")
    run_pipeline(CONFIG, tmp_path, force="evaluate", progress=False, model=cm)
    assert not (tmp_path / "benchmarks.json").exists()
    assert not (tmp_path / "suffix" / "suffix.json").exists()
    assert "OLDTASK" not in (tmp_path / "report.md").read_text()


def test_a_run_that_failed_before_any_result_takes_new_options(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    bad = CONFIG.model_copy(update={"refusal_tokens": None, "n_refusal_probe": 1})
    with pytest.raises(RefdirError, match="refused none"):  # a random model refuses nothing
        run_pipeline(bad, tmp_path, progress=False, model=cm)
    assert list(tmp_path.iterdir()) == []  # nothing to resume: the records are gone again
    assert set(run_pipeline(CONFIG, tmp_path, progress=False, model=cm, until="prompts")) == {
        "prompts"
    }  # the fixed options are taken, not refused as "other options"
    with pytest.raises(RefdirError, match="other options"):  # with results, they are refused
        run_pipeline(bad, tmp_path, progress=False, model=cm)


def test_a_hand_picked_run_is_kept_unless_the_pick_is_repeated_or_forced(tmp_path: Path) -> None:
    cm = tiny_chat_model("llama")
    manual = CONFIG.model_copy(update={"layer": 1, "position": -1})
    run_pipeline(manual, tmp_path, progress=False, model=cm)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(RefdirError, match=r"chosen by hand \(`layer=1` `position=-1`\)"):
        run_pipeline(CONFIG, tmp_path, progress=False, model=cm)  # the pick left out
    bad = CONFIG.model_copy(update={"layer": 99, "position": -1})
    with pytest.raises(RefdirError, match=r"`layer` in 0\.\.2"):
        run_pipeline(bad, tmp_path, progress=False, model=cm)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing removed
    assert run_pipeline(manual, tmp_path, progress=False, model=cm) == {}  # repeated: kept
    done = run_pipeline(CONFIG, tmp_path, force="select", progress=False, model=cm)
    assert "select" in done and not _strict_json(tmp_path / "selection.json")["rule"].startswith(
        "manual"
    )


def test_options_that_cannot_go_together_and_damaged_artifacts(tmp_path: Path) -> None:
    from pydantic import ValidationError

    for update in ({"layer": 1}, {"position": -1}, {"layer": 1, "position": 0}):
        with pytest.raises(ValidationError):
            CONFIG.model_copy(update=update).model_validate({**CONFIG.model_dump(), **update})
    cm = tiny_chat_model("llama")
    run_pipeline(CONFIG, tmp_path, progress=False, model=cm, until="prompts")
    (tmp_path / "prompts.json").write_text('{"harmful_tr')
    with pytest.raises(RefdirError, match=r"prompts.json is damaged .*`force='prompts'`"):
        run_pipeline(CONFIG, tmp_path, progress=False, model=cm)
    (tmp_path / "timings.json").write_text("[")  # informational: a warning, not an error
    run_pipeline(CONFIG, tmp_path, force="prompts", progress=False, model=cm, until="prompts")
    # a run made before parts were timed, or with damaged entries: those times are dropped
    (tmp_path / "timings.json").write_text('{"prompts": 1.5, "parts": {"select": 3}, "x": "y"}')
    run_pipeline(CONFIG, tmp_path, progress=False, model=cm, until="select")
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert "x" not in timings and timings["prompts"] == 1.5  # the good entry is kept
    assert set(timings["parts"]) == {"select"} and "induce" in timings["parts"]["select"]


def test_refusal_tokens_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    from pydantic import ValidationError

    bad = CONFIG.model_copy(update={"refusal_tokens": (5, 10**9)})
    with pytest.raises(RefdirError, match=r"token id 1000000000 is outside .*\(0\.\.260\)"):
        run_pipeline(bad, tmp_path, progress=False, model=tiny_chat_model("llama"))
    for fraction in (0.0, 5.0):
        with pytest.raises(ValidationError):
            RunConfig(max_layer_fraction=fraction)


def test_a_run_records_its_resolved_config_as_toml_that_runs_again(tmp_path: Path) -> None:
    from refdir.study.config import read_config

    layout = {"mlp": "mlp", "layers": None}  # a null pattern: TOML has no null
    config = CONFIG.model_copy(update={"n_eval_harmful": None, "layout": layout})
    run_pipeline(config, tmp_path, progress=False, model=tiny_chat_model("llama"), until="prompts")
    again = RunConfig(**read_config(tmp_path / "config.toml"))
    assert again == config and again.n_eval_harmful is None  # 0 in TOML: all of them
    (tmp_path / "bad.toml").write_text("n_train = 3\nn_trian = 4\n")
    with pytest.raises(RefdirError, match="unknown option 'n_trian'"):
        read_config(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("n_train = \n")
    with pytest.raises(RefdirError, match="is not readable TOML"):
        read_config(tmp_path / "broken.toml")
