"""The report of a `refdir run`: ``report.html`` (self-contained: figures embedded as base64
PNG, inline CSS, no script) and ``report.md`` beside it (figures under ``figures/``), built
from the run's artifacts as blocks that :mod:`refdir.render` writes both ways.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refdir import figures
from refdir.direction import Candidates, Direction
from refdir.errors import RefdirError
from refdir.render import (
    Block,
    Heading,
    Image,
    Para,
    Sample,
    Samples,
    Table,
    fmt,
    key_value_table,
    markdown_section,
    seconds,
    truncate_text,
    with_change,
    write_document,
)

__all__ = [
    "RunData",
    "build_blocks",
    "load_run",
    "picked_by",
    "read_artifact",
    "write_report",
]

STEP_OF = {
    "config.json": "config",
    "prompts.json": "prompts",
    "selection.json": "select",
    "benchmarks.json": "benchmarks",
}
CONDITIONS = figures.CONDITIONS
SAMPLES_PER_CONDITION = 3
PROMPT_CHARS = 160
OPTION_CHARS = 120

# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class RunData:
    """Everything the report reads from a run directory."""

    run_dir: Path
    metrics: dict[str, Any]
    selection: dict[str, Any]
    candidates: Candidates
    direction: Direction
    config: dict[str, Any]
    prompts: dict[str, Any]
    completions: dict[tuple[str, str], list[dict[str, Any]]]
    benchmarks: dict[str, Any]


def _fix(run_dir: Path) -> str:
    return f"run `refdir run --out {run_dir}` first"


def _redo(run_dir: Path, step: str) -> str:
    return f"rerun `refdir run --out {run_dir} --force {step}`"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def read_artifact(run_dir: Path, name: str, required: bool) -> dict[str, Any]:
    """The JSON object in ``run_dir/name``; ``{}`` for a missing optional one; a one-line error
    naming the step to (re)run for a missing required one or one that is not a JSON object."""
    path = run_dir / name
    if not path.exists():
        if required:
            raise RefdirError(f"{path} is missing; {_fix(run_dir)}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fix = _redo(run_dir, STEP_OF.get(path.name, "evaluate"))
        raise RefdirError(f"{path} is not readable JSON ({_first_line(exc)}); {fix}") from None
    if not isinstance(data, dict):
        fix = _redo(run_dir, STEP_OF.get(path.name, "evaluate"))
        raise RefdirError(f"{path} should hold a JSON object; {fix}")
    return data


def _load_candidates(run_dir: Path) -> Candidates:
    path = run_dir / "candidates.safetensors"
    if not path.exists():
        raise RefdirError(f"{path} is missing; {_fix(run_dir)}")
    try:
        return Candidates.load(path)
    except RefdirError:
        raise
    except Exception as exc:
        raise RefdirError(
            f"{path} is not a readable candidates file ({_first_line(exc)}); "
            f"{_redo(run_dir, 'extract')}"
        ) from None


def _load_direction(run_dir: Path, selection: Mapping[str, Any], cands: Candidates) -> Direction:
    """``direction.safetensors`` if present, else the chosen candidate itself."""
    if (run_dir / "direction.safetensors").exists():
        return Direction.load(run_dir)
    chosen = selection.get("chosen") or {}
    if "layer" not in chosen or "position" not in chosen:
        raise RefdirError(
            f"{run_dir / 'selection.json'} names no chosen candidate; {_fix(run_dir)}"
        )
    return cands.direction(int(chosen["position"]), int(chosen["layer"]))


def _read_jsonl(path: Path, run_dir: Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` JSON objects of a JSONL file (the rest is not read)."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                fix = _redo(run_dir, "evaluate")
                raise RefdirError(f"{path} line {number} is not JSON; {fix}") from None
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _load_completions(run_dir: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The first rows of ``completions/{set}.{condition}.jsonl`` keyed by (set, condition);
    empty if the folder is absent."""
    folder = run_dir / "completions"
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.glob("*.jsonl")):
        name, _, condition = path.stem.rpartition(".")
        if name and condition:
            found[(name, condition)] = _read_jsonl(path, run_dir, SAMPLES_PER_CONDITION)
    return found


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (see docs/run-artifacts.md); fail on a missing required artifact."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RefdirError(f"{run_dir} is not a run directory; {_fix(run_dir)}")
    metrics = read_artifact(run_dir, "metrics.json", required=True)
    selection = read_artifact(run_dir, "selection.json", required=True)
    cands = _load_candidates(run_dir)
    return RunData(
        run_dir=run_dir,
        metrics=metrics,
        selection=selection,
        candidates=cands,
        direction=_load_direction(run_dir, selection, cands),
        config=read_artifact(run_dir, "config.json", required=False),
        prompts=read_artifact(run_dir, "prompts.json", required=False),
        completions=_load_completions(run_dir),
        benchmarks=read_artifact(run_dir, "benchmarks.json", required=False),
    )


def _position_text(position: int) -> str:
    if position == -1:
        return "-1 (the last post-instruction token)"
    return f"{position} ({-position - 1} tokens before the last post-instruction token)"


# --------------------------------------------------------------------------- sections


def _grid_count(grid: Any, test: Callable[[Any], bool]) -> int:
    return sum(1 for row in grid or [] for value in row if test(value))


def _count(selection: Mapping[str, Any], metrics: Mapping[str, Any], key: str) -> int | None:
    """``n_candidates`` / ``n_passed`` as recorded in selection.json or metrics.json."""
    for source in (selection, metrics.get("selection") or {}):
        if isinstance(source.get(key), int):
            return int(source[key])
    return None


def _n_candidates(run: RunData) -> int:
    counted = _grid_count(run.selection.get("induce"), lambda v: v is not None)
    return _count(run.selection, run.metrics, "n_candidates") or counted


def _n_passed(selection: Mapping[str, Any], metrics: Mapping[str, Any]) -> int | None:
    if selection.get("passed"):
        return _grid_count(selection["passed"], lambda v: v is True)
    return _count(selection, metrics, "n_passed")


def picked_by(selection: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """How a run's direction was picked: ``manual`` (``--layer``/``--position``), ``fallback``
    (selection.json says so, a rule names a fallback, or no candidate passed the paper's
    filter) or ``filter`` (the paper's rule)."""
    rules = [str(selection.get("rule", "")), str((metrics.get("selection") or {}).get("rule", ""))]
    if any(r.startswith("manual") for r in rules):
        return "manual"
    flagged = (
        selection.get("fallback") is True
        or (metrics.get("selection") or {}).get("fallback") is True
    )
    if flagged or any("fallback" in r.lower() for r in rules) or _n_passed(selection, metrics) == 0:
        return "fallback"
    return "filter"


def _filter_text(selection: Mapping[str, Any]) -> str:
    filters = selection.get("filters") or {}
    parts = []
    if "kl_max" in filters:
        parts.append(f"KL ≤ {filters['kl_max']:g}")
    if "induce_min" in filters:
        parts.append(f"induce ≥ {filters['induce_min']:g}")
    if "max_layer_fraction" in filters:
        parts.append(f"layer < {filters['max_layer_fraction']:g} L")
    return ", ".join(parts) or "the paper's filter"


def _summary(run: RunData) -> list[Block]:
    d = run.direction
    harmful = (run.metrics.get("harmful") or {}).get("refusal_score") or {}
    harmless = (run.metrics.get("harmless") or {}).get("refusal_score") or {}
    text = (
        f"Refusal direction of {run.metrics.get('model', d.model)}: layer {d.layer}, "
        f"position {d.position}, norm {d.norm:.3g}, "
        + {
            "manual": f"chosen by hand among {_n_candidates(run)} candidates.",
            "fallback": f"picked from {_n_candidates(run)} candidates by a fallback rule "
            "(nothing passed the paper's filter).",
            "filter": f"picked from {_n_candidates(run)} candidates.",
        }[picked_by(run.selection, run.metrics)]
    )
    if "baseline" in harmful and "ablation" in harmful:
        text += (
            f" Ablating it moves the refusal score on harmful prompts from "
            f"{fmt(harmful['baseline'])} to {fmt(harmful['ablation'])}."
        )
    if "baseline" in harmless and "actadd" in harmless:
        text += (
            f" Adding it moves the refusal score on harmless prompts from "
            f"{fmt(harmless['baseline'])} to {fmt(harmless['actadd'])}."
        )
    return [Para(text)]


def _direction_section(run: RunData) -> list[Block]:
    d, chosen = run.direction, run.selection.get("chosen") or {}
    n_layers = run.candidates.n_layers
    rows = [
        ["model", str(run.metrics.get("model", d.model))],
        ["layer", f"{d.layer} of {n_layers} (residual stream input of layer {d.layer})"],
        ["position", _position_text(d.position)],
        ["norm", f"{d.norm:.4g}"],
        ["d_model", str(d.d_model)],
        [
            "bypass / induce / KL",
            " / ".join(fmt(chosen.get(k)) for k in ("bypass", "induce", "kl")),
        ],
        [
            "candidates (passed the filter)",
            f"{_n_candidates(run)} ({fmt(_n_passed(run.selection, run.metrics))})",
        ],
        ["selection rule", str(run.selection.get("rule", "—"))],
        ["prompts (harmful / harmless)", f"{fmt(d.n_harmful)} / {fmt(d.n_harmless)}"],
    ]
    blocks: list[Block] = [Heading("Chosen direction"), Table(["", ""], rows)]
    how = picked_by(run.selection, run.metrics)
    if how == "manual":
        blocks.append(
            Para(
                "Chosen by hand (--layer, --position), not by the paper's filter "
                f"({_filter_text(run.selection)}); its selection scores are shown where they "
                "were computed (a candidate the filters had already ruled out is not scored).",
                "note",
            )
        )
    if how == "fallback":
        blocks.append(
            Para(
                "Fallback rule: no candidate passed the paper's filter "
                f"({_filter_text(run.selection)}), so this direction was picked by a fallback "
                "rule and may not remove refusal cleanly. Check the heatmaps and the KL.",
                "warn",
            )
        )
    if (chosen.get("layer"), chosen.get("position")) not in {(None, None), (d.layer, d.position)}:
        blocks.append(
            Para(
                f"direction.json (layer {d.layer}, position {d.position}) differs from the "
                f"candidate chosen in selection.json (layer {chosen.get('layer')}, position "
                f"{chosen.get('position')}).",
                "warn",
            )
        )
    return blocks


def _selection_section(run: RunData) -> list[Block]:
    fig = figures.selection_heatmaps(run.selection, run.candidates.n_layers)
    baseline = run.selection.get("baseline") or {}
    caption = (
        "Scores of every candidate (rows: post-instruction positions; columns: layers). "
        "Bypass and induce are mean refusal log-odds (red: refuses, blue: complies); the black "
        "line on their colour bars is the baseline without intervention "
        f"(harmful_val {fmt(baseline.get('harmful_val'))}, harmless_val "
        f"{fmt(baseline.get('harmless_val'))}). Hatched cells were not scored: a zero difference "
        "of means, or a score the pick cannot use: KL of a candidate already out by its induce, "
        "bypass of one out by its induce or KL, every score past the layer filter "
        "(--score-all scores every cell); the pale region behind the dashed line is excluded by the layer filter; dots "
        f"mark candidates passing every filter ({_filter_text(run.selection)}); the framed cell "
        "is the chosen candidate."
    )
    return [
        Heading("Selection"),
        Image("selection_heatmaps.png", "Selection scores", figures.png_bytes(fig), caption),
    ]


def _refusal_section(run: RunData) -> list[Block]:
    fig = figures.refusal_bars(run.metrics)
    harmful_coeff, harmless_coeff = figures.actadd_coefficients(run.metrics)
    caption = (
        "Fraction of completions scored as refusals (and judged safe, when a judge was set). "
        "Harmful: baseline, the direction ablated at every layer, and activation addition with "
        f"coefficient {harmful_coeff:+g} at its layer. Harmless: baseline and activation "
        f"addition with {harmless_coeff:+g}."
    )
    blocks: list[Block] = [
        Heading("Refusal and safety scores"),
        Image("refusal_scores.png", "Refusal scores", figures.png_bytes(fig), caption),
    ]
    by_set = (run.metrics.get("harmful") or {}).get("by_set") or {}
    if by_set:
        rows = [[name, *(fmt(s.get(c)) for c in CONDITIONS)] for name, s in by_set.items()]
        blocks.append(
            Table(["harmful set", *CONDITIONS], rows, "Refusal score per harmful evaluation set.")
        )
    return blocks


CE_COLUMNS = {
    "ce_loss": "CE loss, text corpus",
    "ce_loss_own_completions": "CE loss, own completions",
}


def _loss_section(run: RunData) -> list[Block]:
    columns = [k for k in CE_COLUMNS if run.metrics.get(k)] or ["ce_loss"]
    rows = []
    for condition in CONDITIONS:
        cells = []
        for key in columns:
            ce = run.metrics.get(key) or {}
            cells.append(
                fmt(ce.get(condition))
                if condition == "baseline"
                else with_change(ce.get(condition), ce.get("baseline"))
            )
        rows.append([condition, *cells])
    harmless = run.metrics.get("harmless") or {}
    blank = [""] * (len(columns) - 1)
    rows.append(["KL(baseline ‖ ablation), harmless", fmt(harmless.get("kl_ablation")), *blank])
    reference = harmless.get("kl_random_directions")
    if reference:
        label = f"the same, median of {reference.get('n')} random directions"
        rows.append([label, fmt(reference.get("median")), *blank])
    texts = {
        "ce_loss": "a plain-text corpus",
        "ce_loss_own_completions": "the model's own baseline completions of harmless prompts",
    }
    caption = (
        "Mean next-token cross-entropy (nats per token; in brackets the change from baseline) "
        f"under each condition, on {' and on '.join(texts[k] for k in columns)}. A large rise "
        "means the intervention damages the model. The KL row is the KL divergence of the "
        "last-position distribution on harmless prompts when the direction is ablated"
        + (", and the row below it the same for random directions." if reference else ".")
    )
    spread = harmless.get("kl_ablation_spread")
    if spread:
        caption += " " + _kl_spread_text(spread)
    if reference:
        caption += " " + _kl_reference_text(reference)
    header = ["condition", *(CE_COLUMNS[k] for k in columns)]
    return [Heading("Loss and KL"), Table(header, rows, caption)]


def _benchmark_section(run: RunData) -> list[Block]:
    scores = run.benchmarks.get("scores") or {}
    if not scores:
        return []
    rows = []
    for task, metrics in scores.items():
        for metric, values in metrics.items():
            base = values.get("baseline")
            rows.append([task, metric, fmt(base), with_change(values.get("ablation"), base)])
    limit = run.benchmarks.get("limit")
    caption = (
        "lm-evaluation-harness scores of the model as it is and with the direction ablated at "
        "every layer and position (the same model as the orthogonalized checkpoint where the "
        "weight edit is exact: the paper's Table 2); in brackets the change from baseline"
        + (f"; at most {limit} items per task." if limit else ".")
    )
    return [Heading("Benchmarks"), Table(["task", "metric", "baseline", "ablation"], rows, caption)]


def _kl_spread_text(spread: dict[str, Any]) -> str:
    groups = []
    for key, label in (("refused_at_baseline", "refused"), ("answered_at_baseline", "answered")):
        group = spread.get(key) or {}
        if group.get("n"):
            noun = "prompt" if group["n"] == 1 else "prompts"
            groups.append(
                f"{fmt(group.get('mean'))} on the {group['n']} {noun} {label} at baseline"
            )
    text = (
        f"Per prompt, that KL has median {fmt(spread.get('median'))}, 90th percentile "
        f"{fmt(spread.get('p90'))} and maximum {fmt(spread.get('max'))}"
    )
    return text + (f"; its mean is {' and '.join(groups)}." if groups else ".")


def _kl_reference_text(reference: dict[str, Any]) -> str:
    below = reference.get("below_chosen")
    share = f"{100 * below:.0f}%" if isinstance(below, int | float) else "?"
    return (
        f"Ablating {reference.get('n')} random directions instead (seed {reference.get('seed')}) "
        f"costs a KL of median {fmt(reference.get('median'))} (10th to 90th percentile "
        f"{fmt(reference.get('p10'))} to {fmt(reference.get('p90'))}); the chosen direction "
        f"costs more than {share} of them."
    )


def _cosine_section(run: RunData) -> list[Block]:
    d = run.direction
    fig = figures.cosine_curves(
        run.candidates.diffs.numpy(), d.vector.double().numpy(), d.layer, d.position
    )
    caption = (
        "Cosine similarity between the chosen direction and the difference-of-means candidate "
        "at every layer, one line per post-instruction position. A broad plateau means the "
        "same direction is present over many layers; the star is the chosen candidate (1 by "
        "construction)."
    )
    cands = run.candidates
    p = cands.positions.index(d.position) if d.position in cands.positions else -1
    projection = figures.projection_curves(
        cands.harmful_mean[p].numpy(),
        cands.harmless_mean[p].numpy(),
        d.vector.double().numpy(),
        d.layer,
    )
    projection_caption = (
        f"The residual stream at position {d.position}, averaged over the training prompts "
        f"({fmt(cands.n_harmful)} harmful, {fmt(cands.n_harmless)} harmless), projected onto "
        "the chosen direction (unit length) at every layer. The shaded gap is the difference "
        "of means along the direction: it opens where the model starts to tell the two kinds "
        "of prompt apart along it."
    )
    return [
        Heading("Cosine similarity across layers"),
        Image("cosine_similarity.png", "Cosine similarity", figures.png_bytes(fig), caption),
        Image(
            "projection.png",
            "Projection onto the direction",
            figures.png_bytes(projection),
            projection_caption,
        ),
    ]


def _set_kind(run: RunData, name: str) -> str:
    sizes = run.metrics.get("sizes") or {}
    if name in (sizes.get("harmless_eval") or {}) or "harmless" in name:
        return "harmless"
    return "harmful"


def _set_order(run: RunData) -> list[str]:
    names = sorted({name for name, _ in run.completions})
    return sorted(names, key=lambda n: (_set_kind(run, n) != "harmful", n))


def _samples(rows: Iterable[dict[str, Any]], truncate: int) -> list[Sample]:
    items = []
    for row in list(rows)[:SAMPLES_PER_CONDITION]:
        refusal = row.get("refusal")
        items.append(
            Sample(
                truncate_text(str(row.get("prompt", "")), PROMPT_CHARS),
                truncate_text(str(row.get("completion", "")), truncate),
                refusal if isinstance(refusal, bool) else None,
            )
        )
    return items


def _completions_section(run: RunData, truncate: int) -> list[Block]:
    if not run.completions:
        return []
    blocks: list[Block] = [
        Heading("Completions"),
        Para(
            f"The first {SAMPLES_PER_CONDITION} completions per set and condition, truncated to "
            f"{truncate} characters. The flag is the refusal-marker score.",
            "note",
        ),
    ]
    for name in _set_order(run):
        blocks.append(Heading(f"{name} ({_set_kind(run, name)})", 3))
        conditions = [c for c in CONDITIONS if (name, c) in run.completions]
        conditions += sorted(c for n, c in run.completions if n == name and c not in CONDITIONS)
        for condition in conditions:
            items = _samples(run.completions[(name, condition)], truncate)
            blocks.append(Samples(condition, items))
    return blocks


def _run_section(run: RunData) -> list[Block]:
    blocks: list[Block] = [Heading("Run")]
    # config.json holds "options" (what changes results) and "run" (every option): show one
    options = run.config.get("run") or {k: v for k, v in run.config.items() if k != "versions"}
    if options:
        shown = {  # a chat template or system prompt is long: config.json has it whole
            k: truncate_text(v, OPTION_CHARS) if isinstance(v, str) else v
            for k, v in options.items()
        }
        cut = shown != options
        caption = (
            f"Text options are cut to {OPTION_CHARS} characters; config.json has them whole."
            if cut
            else ""
        )
        blocks += [Heading("Configuration", 3), key_value_table(shown, caption)]
    if run.config.get("versions"):
        blocks += [Heading("Library versions", 3), key_value_table(run.config["versions"])]
    sizes = dict(run.metrics.get("sizes") or {})
    if run.prompts.get("filter") and "filter" not in sizes:  # runs before the train filter moved
        sizes["validation filter"] = run.prompts["filter"]
    if sizes:
        blocks += [Heading("Sizes", 3), key_value_table(sizes)]
    timings = run.metrics.get("timings") or {}
    if timings:
        parts = run.metrics.get("timing_parts")
        parts = parts if isinstance(parts, dict) else {}  # runs before parts were timed
        rows = []
        for step, value in timings.items():
            rows.append([step, seconds(value)])
            by_part = parts.get(step)
            if isinstance(by_part, dict):
                rows += [[f"· {name}", seconds(t)] for name, t in by_part.items()]
        total = sum(v for v in timings.values() if isinstance(v, int | float))
        rows.append(["total", seconds(total)])
        caption = (
            "Rows marked · are timed parts of the step above them; the rest of a step's "
            "time is loading the model, reading and writing files, and bookkeeping."
            if parts
            else ""
        )
        blocks += [Heading("Wall time per step", 3), Table(["step", "wall time"], rows, caption)]
    if len(blocks) == 1:
        blocks.append(Para("config.json and metrics.json record no configuration.", "note"))
    return blocks


# --------------------------------------------------------------------------- entry point


def build_blocks(run: RunData, truncate: int, suffix_section: str | None = None) -> list[Block]:
    """Every section of the report, in order."""
    blocks = [
        *_summary(run),
        *_direction_section(run),
        *_selection_section(run),
        *_refusal_section(run),
        *_loss_section(run),
        *_benchmark_section(run),
        *_cosine_section(run),
        *_completions_section(run, truncate),
        *_run_section(run),
    ]
    if suffix_section and suffix_section.strip():
        blocks += markdown_section(suffix_section, run.run_dir)
    return blocks


def write_report(
    run_dir: Path, truncate: int = 200, suffix_section: str | None = None
) -> tuple[Path, Path]:
    """Write ``run_dir/report.html`` (self-contained) and ``run_dir/report.md`` with its
    ``figures/*.png``; return (html, md). Completions are cut to ``truncate`` characters."""
    if truncate < 1:
        raise RefdirError(f"truncate must be a positive number of characters, got {truncate}")
    run = load_run(run_dir)
    blocks = build_blocks(run, truncate, suffix_section)
    title = f"refdir report: {run.metrics.get('model', run.direction.model)}"
    return write_document(run.run_dir, "report", title, blocks)
