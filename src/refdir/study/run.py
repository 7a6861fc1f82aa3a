"""`refdir run`: the paper's study of one model, one artifact per step, resumable.

Steps: prompts -> extract -> select -> evaluate -> [benchmarks] -> [suffix] -> report (the
bracketed ones only when asked). A step whose artifact exists is skipped, so a killed run
resumes where it stopped; ``force`` redoes a step and every step after it. The layout of the run folder is documented in docs/run-artifacts.md.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from refdir.activations import extract_candidates
from refdir.benchmarks import ResolvedTasks
from refdir.config import STEPS, RunConfig, check_step, recorded_options
from refdir.data import load_prompts, sample_prompts
from refdir.direction import Candidates, Direction, atomic_path, make_folder
from refdir.errors import RefdirError
from refdir.layout_spec import LayoutSpec
from refdir.model import ORGANISM, ChatModel, load_model, names_local_path
from refdir.select import (
    CandidateScores,
    Selection,
    SelectionConfig,
    ValidationSets,
    derive_refusal_tokens,
    passing,
    pick,
    random_direction_kl,
    score_candidates,
)
from refdir.stopwatch import Stopwatch

__all__ = ["STEPS", "RunConfig", "run_pipeline"]  # RunConfig: from refdir.config

log = logging.getLogger(__name__)


def _write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    """A run artifact's JSON; a damaged one is a one-line error naming the step that writes it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        step = next((k for k, names in ARTIFACTS.items() if path.name in names), "prompts")
        raise RefdirError(
            f"{path} is damaged ({str(exc).splitlines()[0]}); redo it with --force {step}, "
            "or use a new --out"
        ) from None


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "refdir", "peft", "safetensors"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _read_timings(
    path: Path,
) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, str]]:
    """timings.json: the seconds of each step, of the timed parts of some steps, and the device
    each step ran on. A damaged file or entry is dropped with a warning: timings are
    informational."""
    timings: dict[str, float] = {}
    parts: dict[str, dict[str, float]] = {}
    devices: dict[str, str] = {}
    if not path.exists():
        return timings, parts, devices
    try:
        data = _read_json(path)
    except RefdirError:
        data = None
    if not isinstance(data, dict):
        log.warning("%s is damaged; the earlier steps' times are lost", path)
        return timings, parts, devices
    lost = False
    for step, value in data.items():
        if step == "parts" and isinstance(value, dict):
            for name, by_part in value.items():
                if isinstance(by_part, dict) and all(
                    isinstance(t, int | float) for t in by_part.values()
                ):
                    parts[name] = {n: float(t) for n, t in by_part.items()}
                else:
                    lost = True
        elif step == "devices" and isinstance(value, dict):
            devices = {k: v for k, v in value.items() if isinstance(v, str)}
        elif step in STEPS and isinstance(value, int | float):
            timings[step] = float(value)
        else:
            lost = True
    if lost:
        log.warning("%s has damaged entries; their times are lost", path)
    return timings, parts, devices


class Run:
    """One run folder: its config, lazily loaded model and step timings."""

    def __init__(
        self, config: RunConfig, out: Path, progress: bool = True, model: ChatModel | None = None
    ) -> None:
        self.config, self.out, self.progress = config, out, progress
        self._cm = model
        self.benchmark_tasks: ResolvedTasks | None = None  # resolved when the run was checked
        self.watch = Stopwatch()  # the parts of the step running now
        self._used_model = False  # whether the step running now asked for the model
        self.timings, self.parts, self.devices = _read_timings(out / "timings.json")

    @property
    def cm(self) -> ChatModel:
        self._used_model = True
        if self._cm is None:
            c = self.config
            self._cm = load_model(
                c.model,
                dtype=c.dtype,
                device=c.device,
                gguf_file=c.gguf_file,
                trust_remote_code=c.trust_remote_code,
                system=c.system,
                chat_template=c.chat_template,
                layout_spec=LayoutSpec.from_fields(c.layout) if c.layout else None,
            )
            _check_hand_pick(c, self._cm)
        return self._cm

    def step_timings(self) -> dict[str, float]:
        """Wall time of the steps whose results are in the folder (the report's included), in
        the order the steps run."""
        return {
            step: self.timings[step]
            for step in STEPS  # in the order the steps run
            if step in self.timings
            and (step == "report" or all((self.out / a).exists() for a in ARTIFACTS[step]))
        }

    def timing_metrics(self) -> dict[str, Any]:
        """metrics.json's timing keys, for the steps :meth:`step_timings` lists: ``timings``,
        ``timing_parts`` (the timed parts of the select, evaluate and suffix steps) and
        ``timing_devices`` (the device each step ran its model on; steps that load no model,
        such as the report, have none)."""
        steps = self.step_timings()
        return {
            "timings": steps,
            "timing_parts": {step: self.parts[step] for step in steps if self.parts.get(step)},
            "timing_devices": {step: self.devices[step] for step in steps if step in self.devices},
        }

    def timed(self, step: str, fn: Callable[[], None]) -> None:
        self.watch = Stopwatch()
        self._used_model = False
        start = time.perf_counter()
        fn()
        self.timings[step] = round(time.perf_counter() - start, 2)
        parts = self.watch.rounded()
        if parts:
            self.parts[step] = parts
        else:  # a step without timed parts
            self.parts.pop(step, None)
        if self._used_model and self._cm is not None:
            self.devices[step] = str(self._cm.device)
        else:
            self.devices.pop(step, None)
        record = {**self.timings, "parts": self.parts, "devices": self.devices}
        _write_json(self.out / "timings.json", record)
        log.info("step %s done in %.1f s", step, self.timings[step])
        for name, seconds in parts.items():
            log.info("  %s: %.1f s", name, seconds)


# -- step: prompts -------------------------------------------------------------------------


def step_prompts(run: Run) -> None:
    c, cm = run.config, run.cm
    sets = {
        "harmful_train": sample_prompts(c.harmful_train, c.n_train, c.seed),
        "harmless_train": sample_prompts(c.harmless_train, c.n_train, c.seed),
        "harmful_val": sample_prompts(c.harmful_val, c.n_val, c.seed),
        "harmless_val": sample_prompts(c.harmless_val, c.n_val, c.seed),
    }
    if c.refusal_tokens is not None:
        vocab = int(cm.model.get_output_embeddings().weight.shape[0])
        outside = [t for t in c.refusal_tokens if not 0 <= t < vocab]
        if outside:
            raise RefdirError(
                f"--refusal-tokens: token id {outside[0]} is outside the model's vocabulary "
                f"(0..{vocab - 1})"
            )
        tokens: dict[str, Any] = {
            "ids": list(c.refusal_tokens),
            "source": "option --refusal-tokens",
        }
    else:
        found = derive_refusal_tokens(
            cm,
            sets["harmful_train"][: c.n_refusal_probe],
            batch_size=c.gen_batch_size,
            progress=run.progress,
        )
        tokens = {
            "ids": list(found.ids),
            "coverage": found.coverage,
            "n_refusals": found.n_refusals,
            "n_prompts": found.n_prompts,
            "source": "first tokens of the model's own refusals",
        }
    tokens["texts"] = [cm.tokenizer.decode([t]) for t in tokens["ids"]]
    _write_json(run.out / "refusal_tokens.json", tokens)
    # the sets as sampled: each later step filters the prompts it uses in its own pass
    # (training prompts in extract, validation prompts in select)
    _write_json(run.out / "prompts.json", sets)


# -- step: extract -------------------------------------------------------------------------


def step_extract(run: Run) -> None:
    prompts = _read_json(run.out / "prompts.json")
    c = run.config
    tokens = _read_json(run.out / "refusal_tokens.json")["ids"] if c.filter_prompts else None
    cands = extract_candidates(
        run.cm,
        prompts["harmful_train"],
        prompts["harmless_train"],
        c.batch_size,
        run.progress,
        c.harmful_train,
        c.harmless_train,
        refusal_tokens=tokens,  # the paper's filter, in the extraction pass
    )
    cands.save(run.out / "candidates.safetensors")


# -- step: select --------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _nan_to_none(t: torch.Tensor) -> list[list[float | None]]:
    return [[None if v != v else round(float(v), 6) for v in row] for row in t.tolist()]


def _selection_json(
    scores: CandidateScores, chosen: Selection | None, config: SelectionConfig, rule: str
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "positions": scores.positions,
        "layers": scores.layers,
        "bypass": _nan_to_none(scores.bypass),
        "induce": _nan_to_none(scores.induce),
        "kl": _nan_to_none(scores.kl),
        "baseline": {
            "harmful_val": scores.baseline_harmful,
            "harmless_val": scores.baseline_harmless,
        },
        "filters": {
            "kl_max": config.kl_max,
            "induce_min": config.induce_min,
            "max_layer_fraction": config.max_layer_fraction,
            "fallback_kl_bounds": list(config.fallback_kl_bounds),
        },
        "rule": rule,
    }
    passed, n_candidates = passing(scores, config)  # a hand pick or none: the filter's view
    data["passed"] = passed.tolist()
    # a hand pick is no fallback; a selection that picked nothing records null
    data["fallback"] = (
        chosen.fallback if chosen is not None else (False if rule.startswith("manual") else None)
    )
    data["n_candidates"], data["n_passed"] = n_candidates, int(passed.sum())
    return data


def _scores_from_json(data: dict[str, Any]) -> CandidateScores:
    def tensor(rows: list[list[float | None]]) -> torch.Tensor:
        return torch.tensor(
            [[float("nan") if v is None else v for v in row] for row in rows], dtype=torch.float64
        )

    return CandidateScores(
        data["positions"],
        data["layers"],
        tensor(data["bypass"]),
        tensor(data["induce"]),
        tensor(data["kl"]),
        data["baseline"]["harmful_val"],
        data["baseline"]["harmless_val"],
    )


def _scores(
    run: Run, cands: Candidates, config: SelectionConfig
) -> tuple[CandidateScores, dict[str, Any]]:
    """Scores and the validation prompts kept by the filter (with counts), from an earlier
    attempt's selection.json (same run), else computed now."""
    c, out = run.config, run.out
    path = out / "selection.json"
    data = _read_json(path) if path.exists() else {}
    if data.get("validation") and all(k in data for k in ("bypass", "induce", "kl", "baseline")):
        log.info("reusing candidate scores from %s", path)
        return _scores_from_json(data), data["validation"]
    prompts = _read_json(out / "prompts.json")
    tokens = _read_json(out / "refusal_tokens.json")["ids"]
    cm = run.cm  # loading the model is not a part
    # the paper's filter, in the passes that also give selection its baseline
    with run.watch.part("baselines"):
        val = ValidationSets.build(
            cm,
            prompts["harmful_val"],
            prompts["harmless_val"],
            tokens,
            c.filter_prompts,
            c.batch_size,
        )
    kept = {
        "prompts": {"harmful_val": val.harmful, "harmless_val": val.harmless},
        "filter": val.counts(),
    }
    # pruning skips the layers past the layer filter; --score-all scores every layer
    scores = score_candidates(
        cm,
        cands,
        val.harmful,
        val.harmless,
        tokens,
        config,
        None,
        c.batch_size,
        run.progress,
        prune=not c.score_all,
        validation=val,
        stopwatch=run.watch,
    )
    return scores, kept


def _choose(
    c: RunConfig, scores: CandidateScores, config: SelectionConfig
) -> tuple[Selection | None, str, int, int]:
    if c.layer is None and c.position is None:
        chosen = pick(scores, config)
        return chosen, chosen.rule, chosen.layer, chosen.position
    if c.layer is None or c.position is None:
        raise RefdirError("give both --layer and --position to choose the direction by hand")
    if c.position not in scores.positions or not 0 <= c.layer < len(scores.layers):
        raise RefdirError(
            f"--position must be one of {scores.positions} and --layer in 0..{len(scores.layers) - 1}"
        )
    return None, f"manual: --layer {c.layer} --position {c.position}", c.layer, c.position


def step_select(run: Run) -> None:
    out, config = run.out, run.config.selection()
    cands = Candidates.load(out / "candidates.safetensors")
    scores, validation = _scores(run, cands, config)
    try:
        chosen, rule, layer, position = _choose(run.config, scores, config)
    except RefdirError as exc:
        failed = _selection_json(scores, None, config, f"none: {exc}")
        _write_json(out / "selection.json", {**failed, "chosen": None, "validation": validation})
        raise
    p = scores.positions.index(position)
    # a hand pick may be a candidate the pruned scoring left out: its scores are unknown
    picked = {k: _finite(float(getattr(scores, k)[p, layer])) for k in ("bypass", "induce", "kl")}
    data = _selection_json(scores, chosen, config, rule)
    data["chosen"] = {"position": position, "layer": layer, **picked}
    data["validation"] = validation
    direction = cands.direction(position, layer, rule=rule, **picked)
    direction.save(out)
    _write_json(out / "selection.json", data)


# -- step: evaluate ------------------------------------------------------------------------


def _filter_counts(out: Path) -> dict[str, dict[str, int]]:
    """Prompts sampled (prompts.json) and kept by the refusal-metric filter, per set: the
    training sets are filtered in the extract step's pass (the candidates record how many
    prompts their means are over), the validation sets in the select step's (selection.json)."""
    prompts = _read_json(out / "prompts.json")
    cands = Candidates.load(out / "candidates.safetensors")
    counts = {
        "harmful_train": {"sampled": len(prompts["harmful_train"]), "kept": cands.n_harmful},
        "harmless_train": {"sampled": len(prompts["harmless_train"]), "kept": cands.n_harmless},
    }
    counts.update(_read_json(out / "selection.json")["validation"]["filter"])
    return counts


def _kept_harmful_train(out: Path) -> list[str]:
    """The harmful training prompts the difference of means is over."""
    cands = Candidates.load(out / "candidates.safetensors")
    return cands.harmful_prompts or list(_read_json(out / "prompts.json")["harmful_train"])


def _eval_prompts(c: RunConfig) -> tuple[dict[str, list[str]], list[str], list[str]]:
    by_set = {name: sample_prompts(name, c.n_eval_harmful, c.seed) for name in c.harmful_eval}
    harmful = list(dict.fromkeys(p for prompts in by_set.values() for p in prompts))
    harmless = sample_prompts(c.harmless_eval, c.n_eval_harmless, c.seed)
    return by_set, harmful, harmless


def _completions(
    run: Run, jobs: dict[tuple[str, str], tuple[list[str], str, float]], direction: Direction
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Completions of each (group, condition) job, ``(prompts, intervention, coefficient)``,
    read back when its file is there; the jobs still missing are generated together, every
    row under its own job's intervention (one set of decoding batches for all)."""
    from refdir.evaluate import Job, evaluate_jobs

    paths = {key: run.out / "completions" / f"{key[0]}.{key[1]}.jsonl" for key in jobs}
    done = {
        key: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for key, path in paths.items()
        if path.exists()
    }
    missing = [key for key in jobs if key not in done]
    if missing:
        c, cm = run.config, run.cm
        with run.watch.part("completions"):
            results = evaluate_jobs(
                cm,
                [Job(".".join(key), *jobs[key]) for key in missing],
                direction,
                c.max_new_tokens,
                c.gen_batch_size,
                run.progress,
            )
        for key, result in zip(missing, results, strict=True):
            done[key] = result.completions
            _write_jsonl(paths[key], done[key])
    return {key: done[key] for key in jobs}


def _rate(records: Sequence[dict[str, Any]], subset: set[str] | None = None) -> float:
    chosen = [r for r in records if subset is None or r["prompt"] in subset]
    return round(sum(bool(r["refusal"]) for r in chosen) / len(chosen), 4) if chosen else 0.0


def step_evaluate(run: Run) -> None:
    from refdir.metrics import (
        ce_losses,
        completion_rows,
        kl_divergence,
        kl_summary,
        load_corpus,
        random_kl_summary,
        text_rows,
    )

    c, out, cm = run.config, run.out, run.cm
    direction = Direction.load(out)
    by_set, harmful, harmless = _eval_prompts(c)
    conditions = {
        "baseline": ("none", 1.0),
        "ablation": ("ablate", 1.0),
        "actadd": ("actadd", c.harmful_coeff),
    }
    # every completion of the step decodes in the same batches, each row under its condition
    runs = _completions(
        run,
        {
            ("harmful", "baseline"): (harmful, "none", 1.0),
            ("harmless", "baseline"): (harmless, "none", 1.0),
            ("harmful", "ablation"): (harmful, "ablate", 1.0),
            ("harmful", "actadd"): (harmful, "actadd", c.harmful_coeff),
            ("harmless", "actadd"): (harmless, "actadd", c.harmless_coeff),
        },
        direction,
    )
    harmful_runs = {name: runs["harmful", name] for name in ("baseline", "ablation", "actadd")}
    harmless_runs = {name: runs["harmless", name] for name in ("baseline", "actadd")}
    corpus = text_rows(cm, load_corpus(c.ce_corpus, c.n_ce))
    own = completion_rows(cm, harmless, [r["completion"] for r in harmless_runs["baseline"]])
    with run.watch.part("ce text"):
        on_text = ce_losses(cm, corpus, direction, conditions, progress=run.progress)
    with run.watch.part("ce and kl on own completions"):
        on_own = ce_losses(
            cm, own, direction, conditions, progress=run.progress, desc="ce loss (completions)"
        )
    ce = {name: round(losses.ce, 5) for name, losses in on_text.items()}
    ce_own = {name: round(losses.ce, 5) for name, losses in on_own.items()}
    # the KL score's distributions are the logits that predict each completion's first token
    kl = kl_divergence(on_own["baseline"].first, on_own["ablation"].first)
    refused = {r["prompt"]: bool(r["refusal"]) for r in harmless_runs["baseline"]}
    selection = _read_json(out / "selection.json")
    counts = _filter_counts(out)
    metrics: dict[str, Any] = {
        "model": c.model,
        "direction": {
            "layer": direction.layer,
            "position": direction.position,
            "norm": round(direction.norm, 5),
        },
        "selection": {
            "rule": selection["rule"],
            "fallback": selection.get("fallback", False),
            "n_candidates": selection.get("n_candidates"),
            "n_passed": selection.get("n_passed"),
            **{k: selection["chosen"][k] for k in ("bypass", "induce", "kl")},
        },
        "refusal_tokens": _read_json(out / "refusal_tokens.json")["texts"],
        "sizes": {
            **{k: v["kept"] for k, v in counts.items()},
            "filter": counts,
            "harmful_eval": {k: len(v) for k, v in by_set.items()},
            "harmful_eval_unique": len(harmful),
            "harmless_eval": {c.harmless_eval: len(harmless)},
        },
        "harmful": {
            "refusal_score": {k: _rate(v) for k, v in harmful_runs.items()},
            "by_set": {
                name: {k: _rate(v, set(ps)) for k, v in harmful_runs.items()}
                for name, ps in by_set.items()
            },
        },
        "harmless": {
            "refusal_score": {k: _rate(v) for k, v in harmless_runs.items()},
            "kl_ablation": round(float(kl.mean()), 5),
            "kl_ablation_spread": kl_summary(kl, [refused[p] for p in harmless]),
        },
        "ce_loss": ce,
        "ce_loss_own_completions": ce_own,
        "coefficients": {"harmful_actadd": c.harmful_coeff, "harmless_actadd": c.harmless_coeff},
    }
    if c.n_random_kl > 0:
        with run.watch.part("random directions"):
            reference = random_direction_kl(
                cm,
                harmless,
                c.n_random_kl,
                c.seed,
                on_own["baseline"].first,
                c.batch_size,
                run.progress,
            )
        metrics["harmless"]["kl_random_directions"] = random_kl_summary(
            reference, float(kl.mean()), c.seed
        )
    if c.judge is not None:
        metrics["harmful"]["safety_score"] = _safety(run, harmful_runs)
    _write_json(out / "metrics.json", metrics)


def _judge(c: RunConfig) -> tuple[str, str]:
    """The judge's registered name and model folder: an unknown name (close names suggested)
    or a judge without a model is an error."""
    from refdir.scoring.judges import JUDGES

    if c.judge is None:
        raise RefdirError("no judge set; pass --judge NAME --judge-model PATH")
    JUDGES.get(c.judge)
    if c.judge_model is None:
        raise RefdirError("--judge needs --judge-model PATH (a local judge model folder)")
    path = Path(c.judge_model).expanduser()
    if names_local_path(c.judge_model) or path.exists():
        if not path.is_dir():
            raise RefdirError(
                f"--judge-model {c.judge_model}: no such folder; give the judge's folder"
            )
        if not (path / "config.json").is_file():
            raise RefdirError(
                f"--judge-model {c.judge_model} has no config.json; give the judge model's folder"
            )
    return c.judge, c.judge_model


def _safety(run: Run, harmful_runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    from refdir.scoring.judges import load_judge, safety_score

    c = run.config
    name, model = _judge(c)
    judge = load_judge(name, model, device=c.device, dtype=c.dtype, progress=run.progress)
    with run.watch.part("judge"):  # loading the judge model is not a part
        return {
            k: round(safety_score(judge, [r["prompt"] for r in v], [r["completion"] for r in v]), 4)
            for k, v in harmful_runs.items()
        }


# -- step: benchmarks (only with RunConfig.benchmarks) ---------------------------------------


BENCHMARK_CONDITIONS = (("baseline", "none"), ("ablation", "ablate"))
"""The paper's Table 2 compares the model with its orthogonalized copy; the hook ablation is
the same model where the export is exact (docs/orthogonalization.md)."""


def step_benchmarks(run: Run) -> None:
    from refdir.benchmarks import benchmark_conditions

    c = run.config
    log.info("benchmarks: %s", ", ".join(c.benchmarks))
    results = benchmark_conditions(
        run.cm,
        run.benchmark_tasks or list(c.benchmarks),
        {name: (kind, 1.0) for name, kind in BENCHMARK_CONDITIONS},
        Direction.load(run.out),
        c.benchmark_limit,
        list(c.benchmark_path),
        c.batch_size,
    )
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for condition, by_task in results.items():
        for task, metrics in by_task.items():
            for metric, value in metrics.items():
                scores.setdefault(task, {}).setdefault(metric, {})[condition] = round(value, 6)
    _write_json(
        run.out / "benchmarks.json",
        {"tasks": list(c.benchmarks), "limit": c.benchmark_limit, "scores": scores},
    )


# -- step: suffix (only with RunConfig.suffix) -----------------------------------------------


def step_suffix(run: Run) -> None:
    from refdir.suffix import SuffixConfig
    from refdir.suffix_analysis import run_suffix_experiment

    c = run.config
    train = _kept_harmful_train(run.out)[: c.n_suffix_prompts]
    held_out = [p for p in _eval_prompts(c)[1] if p not in set(train)][: c.n_suffix_eval]
    tokens = _read_json(run.out / "refusal_tokens.json")["texts"]
    config = SuffixConfig(
        n_steps=c.suffix_steps,
        seed=c.seed,
        refusal_words=tuple(t.strip() or t for t in tokens),
        max_seconds=c.suffix_max_minutes * 60 if c.suffix_max_minutes > 0 else None,
    )
    run_suffix_experiment(
        run.cm,
        Direction.load(run.out),
        run.out / "suffix",
        train,
        held_out,
        config,
        eval_name="+".join(c.harmful_eval),
        max_new_tokens=c.max_new_tokens,
        batch_size=c.batch_size,
        progress=run.progress,
        stopwatch=run.watch,
    )


# -- step: report --------------------------------------------------------------------------


def step_report(run: Run) -> None:
    from refdir.report import write_report

    suffix_md = None
    suffix_dir = run.out / "suffix"
    if (suffix_dir / "suffix.json").exists():
        from refdir.suffix_analysis import suffix_report_section

        suffix_md = suffix_report_section(suffix_dir, relative_to=run.out)
    metrics = _read_json(run.out / "metrics.json")
    metrics.update(run.timing_metrics())
    _write_json(run.out / "metrics.json", metrics)
    write_report(run.out, truncate=run.config.truncate, suffix_section=suffix_md)


ARTIFACTS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompts.json", "refusal_tokens.json"),
    "extract": ("candidates.safetensors",),
    "select": ("selection.json", "direction.safetensors", "direction.json"),
    "evaluate": ("metrics.json",),
    "benchmarks": ("benchmarks.json",),
    "suffix": ("suffix/suffix.json",),
    "report": ("report.html", "report.md"),
}
STEP_FUNCTIONS: dict[str, Callable[[Run], None]] = {
    "prompts": step_prompts,
    "extract": step_extract,
    "select": step_select,
    "evaluate": step_evaluate,
    "benchmarks": step_benchmarks,
    "suffix": step_suffix,
    "report": step_report,
}


SUFFIX_KEYS = frozenset(
    {"suffix", "n_suffix_prompts", "n_suffix_eval", "suffix_steps", "suffix_max_minutes"}
)
"""Options read only by the suffix step: changing them redoes that step and the report."""

SUFFIX_EVAL_KEYS = frozenset({"harmful_eval", "n_eval_harmful", "max_new_tokens"})
"""Evaluation options that the suffix step reads too."""

COMPLETION_KEYS = frozenset(
    {
        "harmful_eval",
        "harmless_eval",
        "n_eval_harmful",
        "n_eval_harmless",
        "max_new_tokens",
        "harmful_coeff",
        "harmless_coeff",
    }
)
"""Options first read by the evaluate step that decide its completions: changing them redoes
that step, completions included, and the later ones."""

PICK_KEYS = frozenset({"layer", "position"})
"""Options that choose the direction by hand among the scored candidates: changing them
picks again from the scores in selection.json and redoes every later step."""

BENCHMARK_KEYS = frozenset({"benchmarks", "benchmark_path", "benchmark_limit"})
"""Options read only by the benchmarks step: changing them redoes that step (removing its
results when no task is left) and the later ones."""

SCORING_KEYS = frozenset({"n_ce", "ce_corpus", "n_random_kl", "judge", "judge_model"})
"""Options the evaluate step reads after its completions: changing them redoes the step's
scores (the completions on disk are kept) and the later steps."""


def _check_inputs(config: RunConfig, benchmarks_due: bool = False) -> ResolvedTasks | None:
    """Fail at once, before any step runs, on options that a later step would reject minutes
    into the run: an unknown prompt set or file, no held-out harmful set, a judge that cannot
    be built, benchmark tasks that cannot be found (only when that step will run; the tasks
    found are returned for it)."""
    if not config.harmful_eval:
        raise RefdirError("--harmful-eval names no set; give one or more, e.g. harmful_test")
    sets = (
        config.harmful_train,
        config.harmless_train,
        config.harmful_val,
        config.harmless_val,
        *config.harmful_eval,
        config.harmless_eval,
    )
    for name in dict.fromkeys(sets):
        load_prompts(name)
    if config.judge is not None or config.judge_model is not None:
        _judge(config)
    if benchmarks_due:
        from refdir.benchmarks import resolve_tasks

        return resolve_tasks(config.benchmarks, config.benchmark_path)
    return None


def _remove(out: Path, steps: Sequence[str], completions: bool) -> None:
    """Delete the artifacts of ``steps`` (and the completion files, with ``completions``)."""
    for step in steps:
        for name in ARTIFACTS[step]:
            (out / name).unlink(missing_ok=True)
    if completions:
        for stale in (out / "completions").glob("*.jsonl"):
            stale.unlink()


def _recorded(out: Path) -> dict[str, Any]:
    """The options recorded in ``out/config.json`` (:func:`recorded_options`); ``{}`` if none."""
    path = out / "config.json"
    return recorded_options(_read_json(path).get("options", {})) if path.exists() else {}


def _changed(config: RunConfig, recorded: dict[str, Any]) -> set[str]:
    """The options that differ from the ``recorded`` ones (none recorded: none differ)."""
    new = config.result_keys()
    return {k for k in new if recorded and recorded[k] != new[k]}


def _enabled(config: RunConfig, step: str) -> bool:
    """Whether ``step`` is part of this run (benchmarks and suffix only when asked)."""
    if step == "benchmarks":
        return bool(config.benchmarks)
    return config.suffix if step == "suffix" else True


def _benchmarks_due(config: RunConfig, out: Path, force_from: int) -> bool:
    """Whether the benchmarks step will run now (so its tasks must resolve)."""
    if not config.benchmarks:
        return False
    forced = force_from <= STEPS.index("benchmarks")
    missing = not (out / ARTIFACTS["benchmarks"][0]).exists()
    return forced or missing or bool(_changed(config, _recorded(out)) & BENCHMARK_KEYS)


def _check_hand_pick(config: RunConfig, cm: ChatModel) -> None:
    """A hand-picked candidate must exist in this model: checked when it is loaded, before any
    step's work."""
    if config.layer is None or config.position is None:
        return
    n_post = cm.chat.n_post
    if not (0 <= config.layer < cm.n_layers and -n_post <= config.position <= -1):
        raise RefdirError(
            f"--layer {config.layer} --position {config.position} is not a candidate of "
            f"{cm.name}: --layer must be in 0..{cm.n_layers - 1} and --position in "
            f"-{n_post}..-1"
        )


def _check_pick(config: RunConfig, old: dict[str, Any], out: Path, force_from: int) -> None:
    """Before a changed hand pick removes anything: a folder whose direction was chosen by hand
    (``old``: its recorded options) keeps it unless the pick is repeated, changed, or selection
    is forced; a new hand pick must name a scored candidate."""
    if config.layer is None and force_from > STEPS.index("select"):
        raise RefdirError(
            f"{out} holds a direction chosen by hand (--layer {old.get('layer')} --position "
            f"{old.get('position')}); repeat them, or add --force select to pick by the "
            "paper's rule"
        )
    path = out / "selection.json"
    if config.layer is not None and path.exists():
        data = _read_json(path)
        positions, n_layers = data.get("positions") or [], len(data.get("layers") or [])
        if config.position not in positions or not 0 <= config.layer < n_layers:
            raise RefdirError(
                f"--position must be one of {positions} and --layer in 0..{n_layers - 1}"
            )


def _check_config(config: RunConfig, out: Path, force_from: int) -> bool:
    """Refuse to mix options in one folder, except a hand-picked direction and the options
    read only by the evaluate, benchmarks and suffix steps: the steps that read a changed one
    are stale, and their artifacts (and the report's) are removed now, so that a run stopped
    before redoing them leaves none behind. Returns whether the completion files on disk
    still hold."""
    path = out / "config.json"
    keep_completions = force_from > STEPS.index("evaluate")
    # a folder with no results yet (a run that failed in its first step) takes new options
    results = any((out / name).exists() for names in ARTIFACTS.values() for name in names)
    if results and not path.exists() and force_from > 0:
        raise RefdirError(
            f"{out} holds results but no config.json (a `refdir extract` folder?); give "
            "`refdir run` a folder of its own"
        )
    if path.exists() and force_from > 0 and results:
        recorded = _recorded(out)
        changed = _changed(config, recorded)
        later = SUFFIX_KEYS | COMPLETION_KEYS | SCORING_KEYS | BENCHMARK_KEYS | PICK_KEYS
        core = sorted(changed - later)
        if core:
            raise RefdirError(
                f"{out} holds a run with other options ({', '.join(core)}); "
                "use another --out, or --force prompts to redo it"
            )
        stale = set()
        if changed & PICK_KEYS:  # another pick among the same scores, which selection.json keeps
            _check_pick(config, recorded, out, force_from)
            for name in ARTIFACTS["select"]:
                if name != "selection.json":
                    (out / name).unlink(missing_ok=True)
            stale |= {"evaluate", "benchmarks", "suffix"}
            keep_completions = False
        if changed & COMPLETION_KEYS:
            stale.add("evaluate")
            keep_completions = False
        if changed & SUFFIX_EVAL_KEYS:  # the suffix analysis's held-out prompts and lengths
            stale.add("suffix")
        if changed & SCORING_KEYS:
            stale.add("evaluate")
        if changed & BENCHMARK_KEYS:
            stale.add("benchmarks")
        if changed & SUFFIX_KEYS and config.suffix:
            stale.add("suffix")
        if stale:
            stale.add("report")
        _remove(out, [step for step in STEPS if step in stale], completions=not keep_completions)
    _write_json(
        path,
        {
            "options": config.result_keys(),
            "run": config.model_dump(mode="json"),
            # a relative "runs/merged" reads like a hub id elsewhere: say what it was here
            "local_model": config.model != ORGANISM and Path(config.model).expanduser().exists(),
            "versions": versions(),
        },
    )
    return keep_completions


def run_pipeline(
    config: RunConfig,
    out: str | Path,
    force: str | None = None,
    progress: bool = True,
    model: ChatModel | None = None,
    until: str | None = None,
) -> dict[str, float]:
    """Run (or resume) every step into ``out``; ``force`` redoes that step and the later ones.
    Returns the wall time of each step run now."""
    out = Path(out)
    check_step(force, "--force")
    check_step(until, "--until")
    force_from = STEPS.index(force) if force is not None else len(STEPS)
    tasks = _check_inputs(config, _benchmarks_due(config, out, force_from))
    make_folder(out)
    keep_completions = _check_config(config, out, force_from)
    run = Run(config, out, progress, model)
    run.benchmark_tasks = tasks
    done: dict[str, float] = {}
    last = STEPS.index(until) if until is not None else len(STEPS) - 1
    for i, step in enumerate(STEPS[: last + 1]):
        if not _enabled(config, step):
            if i >= force_from:  # forced: results of a step no longer asked for go too
                _remove(out, [step], completions=False)
            continue
        finished = all((out / name).exists() for name in ARTIFACTS[step])
        if finished and i < force_from:
            log.info("step %s: artifacts present, skipped", step)
            continue
        if i >= force_from:
            _remove(out, [step], completions=step == "evaluate" and not keep_completions)
        log.info("step %s", step)
        run.timed(step, lambda step=step: STEP_FUNCTIONS[step](run))  # type: ignore[misc]
        done[step] = run.timings[step]
    if done and (out / "metrics.json").exists():
        metrics = _read_json(out / "metrics.json")
        metrics.update(run.timing_metrics())
        _write_json(out / "metrics.json", metrics)
    return done
