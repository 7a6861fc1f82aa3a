from __future__ import annotations

import json
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.benchmarks import offline, run_benchmarks, write_multiple_choice_task
from refdir.interventions.intervention import Intervention, ablate
from refdir.model.chat_model import ChatModel
from tiny import tiny_chat_model

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed (bench extra)"
)

# equal-length choices, so the tiny model's choice is not just the shortest answer
CHOICES = [
    ["red", "tan", "owl"],
    ["sky", "owl", "bee"],
    ["fig", "cup", "tan"],
    ["ink", "sun", "map"],
    ["bee", "map", "oak"],
    ["jam", "oak", "fig"],
]
ITEMS: list[dict[str, Any]] = [
    {"question": f"Which word is number {i}?", "choices": c, "answer": i % 3}
    for i, c in enumerate(CHOICES)
]


@pytest.fixture(scope="module")
def cm() -> ChatModel:
    return tiny_chat_model("llama", seed=2)


@pytest.fixture(scope="module")
def direction(cm: ChatModel) -> Direction:
    torch.manual_seed(1)
    return Direction(8.0 * torch.randn(cm.d_model), layer=1, position=-1, model=cm.name)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    return write_multiple_choice_task(root, "tiny_mc", ITEMS, cache_dir=root / "cache")


def _hand_accuracy(cm: ChatModel, scope: AbstractContextManager[Any]) -> float:
    """lm_eval's multiple-choice accuracy worked by hand: the choice whose tokens (after a
    space) have the highest summed log-probability after the question, one forward each."""
    right = 0
    with scope, torch.no_grad():
        for item in ITEMS:
            context = f"Question: {item['question']}\nAnswer:"
            n = len(cm.tokenizer(context)["input_ids"])
            scores = []
            for choice in item["choices"]:
                ids = cm.tokenizer(f"{context} {choice}")["input_ids"]
                logp = cm.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
                scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids))))
            right += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
    return right / len(ITEMS)


@pytest.fixture(scope="module")
def scores(cm: ChatModel, direction: Direction, task: Path) -> dict[str, float]:
    plain = run_benchmarks(cm, [task], batch_size=4)
    ablated = run_benchmarks(
        cm, ["tiny_mc"], include_path=[task.parent], intervention=Intervention.ablation(direction)
    )
    return {"plain": plain["tiny_mc"]["acc"], "ablated": ablated["tiny_mc"]["acc"]}


def test_benchmark_accuracy_is_lm_evals_on_the_hooked_model(
    cm: ChatModel, direction: Direction, scores: dict[str, float]
) -> None:
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores["plain"] == _hand_accuracy(cm, nullcontext())
    assert scores["ablated"] == _hand_accuracy(cm, ablate(cm, direction))
    assert scores["plain"] != scores["ablated"], "ablation reached the benchmarked model"


def test_benchmark_under_a_callers_scope_and_limit(
    cm: ChatModel, direction: Direction, task: Path, scores: dict[str, float]
) -> None:
    with ablate(cm, direction):
        inside = run_benchmarks(cm, [task], limit=len(ITEMS))
    assert inside["tiny_mc"]["acc"] == scores["ablated"]
    assert set(inside["tiny_mc"]) == {"acc", "acc_norm"}


def test_benchmark_rejects_unknown_tasks_with_a_hint(cm: ChatModel, task: Path) -> None:
    with pytest.raises(RefdirError, match="did you mean 'tiny_mc'"):
        run_benchmarks(cm, ["tiny_m"], include_path=[task.parent])
    with pytest.raises(RefdirError, match="does not exist"):
        run_benchmarks(cm, [task.parent / "missing.yaml"])
    with pytest.raises(RefdirError, match="non-empty list"):
        run_benchmarks(cm, [])


def test_task_writer_checks_items(tmp_path: Path) -> None:
    with pytest.raises(RefdirError, match="item 0 needs"):
        write_multiple_choice_task(
            tmp_path, "bad", [{"question": "q", "choices": ["a"], "answer": 0}]
        )
    with pytest.raises(RefdirError, match="letters, digits"):
        write_multiple_choice_task(tmp_path, "bad name", ITEMS)


def test_offline_sets_and_restores_the_hub_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
        assert datasets.config.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert datasets.config.HF_HUB_OFFLINE is False


def test_missing_lm_eval_is_a_one_line_error(
    cm: ChatModel, task: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import now raises ImportError
    with pytest.raises(RefdirError, match=r"pip install 'refdir\[bench\]'"):
        run_benchmarks(cm, [task])


def test_run_pipeline_benchmarks_the_chosen_direction(
    cm: ChatModel, task: Path, tmp_path: Path
) -> None:
    from refdir.study.run import run_pipeline
    from test_pipeline import CONFIG

    config = CONFIG.model_copy(update={"benchmarks": (str(task),)})
    done = run_pipeline(config, tmp_path, progress=False, model=cm)
    assert "benchmarks" in done
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    direction = Direction.load(tmp_path)
    plain = run_benchmarks(cm, [task])["tiny_mc"]
    ablated = run_benchmarks(cm, [task], intervention=Intervention.ablation(direction))["tiny_mc"]
    for metric in ("acc", "acc_norm"):
        assert saved["scores"]["tiny_mc"][metric] == {
            "baseline": round(plain[metric], 6),
            "ablation": round(ablated[metric], 6),
        }
    timings = json.loads((tmp_path / "metrics.json").read_text())["timings"]
    assert list(timings) == ["prompts", "extract", "select", "evaluate", "benchmarks", "report"]
    report = (tmp_path / "report.md").read_text()
    assert "## Benchmarks" in report and f"| tiny\\_mc | acc | {plain['acc']:.3f} |" in report
    # a benchmark option redoes that step and the report only; no benchmarks: no section
    completions = {p: p.stat().st_mtime_ns for p in (tmp_path / "completions").glob("*")}
    metrics = (tmp_path / "metrics.json").read_text()
    limited = config.model_copy(update={"benchmark_limit": 2})
    assert set(run_pipeline(limited, tmp_path, progress=False, model=cm)) == {
        "benchmarks",
        "report",
    }
    assert json.loads((tmp_path / "benchmarks.json").read_text())["limit"] == 2
    none = limited.model_copy(update={"benchmarks": ()})
    assert set(run_pipeline(none, tmp_path, progress=False, model=cm)) == {"report"}
    assert not (tmp_path / "benchmarks.json").exists()
    assert "## Benchmarks" not in (tmp_path / "report.md").read_text()
    assert "benchmarks" not in json.loads((tmp_path / "metrics.json").read_text())["timings"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "completions").glob("*")} == completions
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["harmful"]
        == json.loads(metrics)["harmful"]
    )


_MANAGERS: dict[Any, Any] = {}


@pytest.fixture
def index_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm_eval indexes its built-in tasks (10-30 s) for a name found nowhere else: the cases
    that need the index share one, made by lm_eval's own TaskManager."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager

    def manager(include_path: Any = None, include_defaults: bool = True) -> Any:
        key = (tuple(include_path or ()), include_defaults)
        if key not in _MANAGERS:
            _MANAGERS[key] = real(include_path=include_path, include_defaults=include_defaults)
        return _MANAGERS[key]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", manager)


@pytest.mark.usefixtures("index_once")
@pytest.mark.parametrize(
    ("tasks", "path", "message"),
    [
        (("missing.yaml",), (), "task file .*missing.yaml does not exist"),
        (("tiny_m",), ("tasks",), "did you mean 'tiny_mc'"),
        (("zzzz",), ("tasks",), "'zzzz'; give a task YAML file, or the folder"),
        (("tiny_mc",), ("nowhere",), "task folder .*nowhere does not exist"),
    ],
    ids=["missing file", "close name", "unknown name", "missing folder"],
)
def test_run_pipeline_checks_the_tasks_before_any_step(
    task: Path, tmp_path: Path, tasks: tuple[str, ...], path: tuple[str, ...], message: str
) -> None:
    from refdir.study.run import run_pipeline
    from test_pipeline import CONFIG

    def where(name: str) -> str:  # names in the task folder, or beside the scratch folder
        return str(task.parent / name) if name != "nowhere" else str(tmp_path / name)

    update = {
        "benchmarks": tuple(where(t) if t.endswith(".yaml") else t for t in tasks),
        "benchmark_path": tuple(str(task.parent) if p == "tasks" else where(p) for p in path),
    }
    out = tmp_path / "run"
    with pytest.raises(RefdirError, match=message) as err:
        run_pipeline(
            CONFIG.model_copy(update=update), out, progress=False, model=tiny_chat_model("llama")
        )
    assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())


def test_a_task_whose_data_is_missing_is_a_one_line_error(cm: ChatModel, tmp_path: Path) -> None:
    task = write_multiple_choice_task(tmp_path, "gone", ITEMS, cache_dir=tmp_path / "cache")
    for data in tmp_path.glob("gone*.jsonl"):
        data.unlink()
    with pytest.raises(RefdirError, match=r"lm_eval could not run gone: .*check the task's data"):
        run_benchmarks(cm, [task])
