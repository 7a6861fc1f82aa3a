"""Capability benchmarks through lm-evaluation-harness, on the in-memory (hooked) model.

The ChatModel's own model object is wrapped as lm_eval's ``HFLM``, so an intervention, applied
here (``intervention=...``) or around the call, is what gets benchmarked; no checkpoint is
written. Tasks come from local files: a task YAML whose data is a local JSONL file

    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/items.jsonl}}

and everything runs with the Hugging Face hub and datasets offline. ``write_multiple_choice_task``
writes such a pair. Needs the ``bench`` extra: ``pip install 'refdir[bench]'``.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refdir.errors import RefdirError
from refdir.interventions.intervention import NONE, Intervention
from refdir.io import make_folder, write_text
from refdir.model.chat_model import ChatModel

__all__ = [
    "ResolvedTasks",
    "benchmark_conditions",
    "offline",
    "resolve_tasks",
    "run_benchmarks",
    "write_multiple_choice_task",
]

PathLike = str | os.PathLike[str]

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_OFFLINE_FLAGS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


@contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets offline for the block: the environment variables, and the flags the
    libraries read once at import; everything is restored afterwards."""
    modules = {}
    for name, _ in _OFFLINE_FLAGS:  # import first, so the flags are read before we set them
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            continue
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    saved_flags = [
        (modules[m], attr, getattr(modules[m], attr))
        for m, attr in _OFFLINE_FLAGS
        if m in modules and hasattr(modules[m], attr)
    ]
    os.environ.update(_OFFLINE_ENV)
    for module, attr, _ in saved_flags:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in saved_flags:
            setattr(module, attr, value)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _lm_eval() -> Any:
    try:
        return importlib.import_module("lm_eval")
    except ImportError:
        raise RefdirError(
            "lm-evaluation-harness is not installed; pip install 'refdir[bench]'"
        ) from None


def _yaml_path(entry: Any) -> Path | None:
    path = getattr(entry, "yaml_path", None)
    if path is None and isinstance(entry, Mapping):
        path = entry.get("yaml_path")
    return None if path in (None, -1) else Path(path).resolve()


def _task_names(
    tasks: Sequence[PathLike], include_path: Sequence[PathLike], include_defaults: bool | None
) -> tuple[list[str], Any]:
    """lm_eval task names for ``tasks`` (names, or task YAML files), and the TaskManager.
    ``include_defaults=None``: lm_eval's built-in tasks are indexed (15-30 s) only when a
    name is not found in ``include_path`` or beside the task files."""
    from lm_eval.tasks import TaskManager  # optional (refdir[bench]); callers check it is there

    if isinstance(tasks, str | os.PathLike) or not tasks:
        raise RefdirError("give a non-empty list of benchmark tasks")
    files = [Path(t).resolve() for t in tasks if str(t).endswith((".yaml", ".yml"))]
    for f in files:
        if not f.is_file():
            raise RefdirError(f"task file {f} does not exist")
    for folder in include_path:
        if not Path(folder).is_dir():
            raise RefdirError(f"benchmark task folder {folder} does not exist")
    roots = [str(Path(p)) for p in include_path] + sorted({str(f.parent) for f in files})
    manager = TaskManager(include_path=roots or None, include_defaults=bool(include_defaults))
    named = [str(t) for t in tasks if not str(t).endswith((".yaml", ".yml"))]
    if include_defaults is None and any(n not in manager.all_tasks for n in named):
        manager = TaskManager(include_path=roots or None, include_defaults=True)
    names: list[str] = []
    for task in tasks:
        if str(task).endswith((".yaml", ".yml")):
            names.extend(_names_in_file(manager, Path(task).resolve()))
        elif str(task) not in manager.all_tasks:
            raise RefdirError(_unknown_task(str(task), manager.all_tasks, include_defaults))
        else:
            names.append(str(task))
    return names, manager


@dataclass(frozen=True)
class ResolvedTasks:
    """lm_eval task names and the TaskManager that found them (indexing lm_eval's built-in
    tasks takes 15-30 s, so a resolution is kept and passed on)."""

    names: list[str]
    manager: Any


def resolve_tasks(
    tasks: Sequence[PathLike], include_path: Sequence[PathLike] = ()
) -> ResolvedTasks:
    """Find ``tasks`` (YAML files, or names in ``include_path``, else among lm_eval's built-in
    tasks) now; a one-line error for lm_eval not installed, a missing task file or folder, or a
    name found nowhere. Pass the result to :func:`benchmark_conditions`."""
    with offline():
        _lm_eval()
        return ResolvedTasks(*_task_names(tasks, include_path, None))


def _names_in_file(manager: Any, path: Path) -> list[str]:
    found = [name for name, entry in manager.task_index.items() if _yaml_path(entry) == path]
    if not found:
        raise RefdirError(f"{path} defines no lm_eval task (it needs a 'task:' name)")
    return sorted(found)


def _unknown_task(name: str, known: Sequence[str], include_defaults: bool | None) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    where = " (built-in tasks need include_defaults=True)" if include_defaults is False else ""
    fix = (
        ""
        if close
        else "; give a task YAML file, or the folder that defines it in `benchmark_path`"
    )
    return f"unknown benchmark task {name!r}{hint}{where}{fix}"


def _scores(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Numeric metrics per task, stderr dropped, the default filter's ``,none`` stripped."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            metric = key.removesuffix(",none")
            if "_stderr" in metric or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and key != "sample_len" and math.isfinite(value):
                row[metric] = float(value)
        out[str(task)] = row
    return out


def run_benchmarks(
    cm: ChatModel,
    tasks: Sequence[PathLike],
    limit: int | float | None = None,
    *,
    intervention: Intervention = NONE,
    include_path: Sequence[PathLike] = (),
    include_defaults: bool | None = False,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    apply_chat_template: bool = False,
    bootstrap_iters: int = 0,
) -> dict[str, dict[str, float]]:
    """Scores ``{task: {metric: value}}`` of the model under an intervention (or whatever
    intervention the caller applied around the call).

    ``tasks``: task YAML files, or names found in ``include_path`` folders (and, with
    ``include_defaults``, lm_eval's built-in tasks, whose datasets must already be in the local
    Hugging Face cache; ``None``: searched only for names found nowhere else). ``limit``: at
    most that many items per task (a float: a fraction).
    """
    intervention.hooks(cm)  # validate before lm_eval starts
    options = _Options(limit, num_fewshot, batch_size, max_length, apply_chat_template)
    scores = _evaluate(
        cm, tasks, include_path, include_defaults, options, bootstrap_iters, [intervention]
    )
    return scores[0]


def benchmark_conditions(
    cm: ChatModel,
    tasks: Sequence[PathLike] | ResolvedTasks,
    conditions: Mapping[str, Intervention],
    limit: int | float | None = None,
    include_path: Sequence[PathLike] = (),
    batch_size: int = 8,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{condition: {task: {metric: value}}}`` for several conditions (name -> intervention),
    the tasks resolved (unless given resolved by :func:`resolve_tasks`) and the model wrapped
    once. Built-in task names are looked up only when not found in ``include_path``."""
    if not conditions:
        raise RefdirError("give at least one condition to benchmark under")
    for condition in conditions.values():
        condition.hooks(cm)  # validate before lm_eval starts
    options = _Options(limit, None, batch_size, None, False)
    results = _evaluate(cm, tasks, include_path, None, options, 0, list(conditions.values()))
    return dict(zip(conditions, results, strict=True))


@dataclass(frozen=True)
class _Options:
    limit: int | float | None
    num_fewshot: int | None
    batch_size: int
    max_length: int | None
    apply_chat_template: bool


def _evaluate(
    cm: ChatModel,
    tasks: Sequence[PathLike] | ResolvedTasks,
    include_path: Sequence[PathLike],
    include_defaults: bool | None,
    options: _Options,
    bootstrap_iters: int,
    conditions: Sequence[Intervention],
) -> list[dict[str, dict[str, float]]]:
    """lm_eval's scores of ``tasks`` under each intervention in turn."""
    if options.batch_size <= 0:
        raise RefdirError(f"`batch_size` must be positive, got {options.batch_size}")
    out = []
    with offline():
        lm_eval = _lm_eval()
        from lm_eval.models.huggingface import HFLM  # optional (refdir[bench]), checked above

        if isinstance(tasks, ResolvedTasks):
            names, manager = tasks.names, tasks.manager
        else:
            names, manager = _task_names(tasks, include_path, include_defaults)
        lm = HFLM(
            pretrained=cm.model,
            tokenizer=cm.tokenizer,
            batch_size=options.batch_size,
            max_length=options.max_length,
        )
        for condition in conditions:
            try:
                with condition.apply(cm):
                    results = lm_eval.simple_evaluate(
                        model=lm,
                        tasks=names,
                        task_manager=manager,
                        limit=options.limit,
                        num_fewshot=options.num_fewshot,
                        bootstrap_iters=bootstrap_iters,
                        apply_chat_template=options.apply_chat_template,
                        log_samples=False,
                    )
            except (OSError, ValueError, KeyError) as exc:  # a task's data missing or malformed
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise RefdirError(
                    f"lm_eval could not run {', '.join(names)}: {reason}; check the task's "
                    "data files (absolute paths, in the local cache when offline)"
                ) from None
            if not results:
                raise RefdirError("lm_eval returned no results")
            out.append(_scores(results["results"]))
    return out


def write_multiple_choice_task(
    folder: PathLike,
    name: str,
    items: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = ("acc", "acc_norm"),
    cache_dir: PathLike | None = None,
) -> Path:
    """Write ``{name}.jsonl`` and ``{name}.yaml`` (an lm_eval multiple-choice task over local
    data) into ``folder``; return the YAML path. Items: ``{"question", "choices", "answer"}``
    with ``answer`` the index of the right choice. ``cache_dir``: where ``datasets`` keeps its
    Arrow copy of the data (default: the Hugging Face cache)."""
    if not name.replace("_", "").isalnum():
        raise RefdirError(f"task name {name!r} must be letters, digits and underscores")
    for i, item in enumerate(items):
        _check_item(i, item)
    root = Path(folder).expanduser().resolve()
    make_folder(root)
    data = root / f"{name}.jsonl"
    write_text(data, "".join(json.dumps(dict(item)) + "\n" for item in items))
    yaml = root / f"{name}.yaml"
    cache = None if cache_dir is None else Path(cache_dir).expanduser().resolve()
    write_text(yaml, _task_yaml(name, data, metrics, cache))
    return yaml


def _check_item(index: int, item: Mapping[str, Any]) -> None:
    choices = item.get("choices")
    answer = item.get("answer")
    ok = (
        isinstance(item.get("question"), str)
        and isinstance(choices, list)
        and len(choices) >= 2
        and all(isinstance(c, str) for c in choices)
        and isinstance(answer, int)
        and 0 <= answer < len(choices)
    )
    if not ok:
        raise RefdirError(
            f"item {index} needs 'question' (text), 'choices' (2+ texts) and 'answer' "
            "(the index of the right choice)"
        )


def _task_yaml(name: str, data: Path, metrics: Sequence[str], cache: Path | None) -> str:
    q = json.dumps  # a JSON string is a valid YAML scalar
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(str(data))}",
        *([f"  cache_dir: {q(str(cache))}"] if cache is not None else []),
        "test_split: test",
        "output_type: multiple_choice",
        f"doc_to_text: {q('Question: {{question}}' + chr(10) + 'Answer:')}",
        f"doc_to_choice: {q('{{choices}}')}",
        "doc_to_target: answer",
        "metric_list:",
    ]
    for metric in metrics:
        lines += [f"  - metric: {metric}", "    aggregation: mean", "    higher_is_better: true"]
    return "\n".join([*lines, "metadata:", "  version: 1.0", ""])
