"""Several `refdir run` folders side by side: the paper's cross-model figures and tables.

Arditi et al. show each result across 13 models at once (refusal and safety under ablation,
refusal of harmless prompts under activation addition, the chosen layer, the loss in
coherence). :func:`write_comparison` reads each finished run's ``metrics.json``,
``selection.json`` and ``config.json`` and writes ``comparison.html`` (self-contained),
``comparison.md`` (figures under ``figures/``) and ``comparison.csv`` (one row per run, the
numbers of the tables) into one folder. Runs that differ in more than the model are flagged:
their numbers are only comparable when the prompts and sizes are the same.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.run import BenchmarksRecord, ConfigRecord, TimingsRecord
from refdir.artifacts.selection import SelectionRecord
from refdir.errors import RefdirError
from refdir.io import make_folder, write_text
from refdir.model.loading import names_local_path
from refdir.report import figures
from refdir.report.blocks import (
    Block,
    Heading,
    Image,
    Para,
    Table,
    fmt,
    seconds,
    truncate_text,
    with_change,
)
from refdir.report.render import write_document
from refdir.report.run_report import picked_by
from refdir.report.stability import (
    StabilityGroup,
    measure_group,
    stability_blocks,
    stability_groups,
)

__all__ = ["RunSummary", "comparison_blocks", "comparison_rows", "load_summary", "write_comparison"]

CONDITIONS = figures.CONDITIONS
HARMLESS_CONDITIONS = ("baseline", "actadd")
OPTION_CHARS = 60
"""Characters of an option's value shown in the settings table (a chat template is long)."""
IGNORED_OPTIONS = frozenset({"model", "gguf_file"})
"""Options that name the model rather than change how it is measured."""
STEPS = tuple(f for f in TimingsRecord.model_fields if f not in ("parts", "devices"))
"""The steps of a run, in the order they run."""


@dataclass(frozen=True)
class RunSummary:
    """What the comparison reads from one finished run."""

    label: str
    run_dir: Path
    metrics: MetricsRecord
    selection: SelectionRecord
    options: dict[str, Any]
    benchmarks: BenchmarksRecord | None
    local: bool = False
    """Whether the model was a local path where the run ran (``config.json``'s ``local_model``)."""

    @property
    def model(self) -> str:
        return self.metrics.model

    @property
    def short_name(self) -> str:
        """The model's name for a label: a GGUF file's stem, a local folder's or file's name,
        a hub id or ``organism`` as is."""
        gguf = self.options.get("gguf_file")
        if isinstance(gguf, str) and gguf:
            return Path(gguf).name.removesuffix(".gguf")
        path = Path(self.model)
        if self.local or path.exists() or names_local_path(self.model):  # wherever compared
            return path.name.removesuffix(".gguf")
        return self.model

    @property
    def n_layers(self) -> int:
        return len(self.selection.layers)

    def score(self, kind: str, key: str, condition: str) -> float | None:
        """``metrics.kind.key.condition`` (e.g. harmful, refusal_score, ablation), or None
        where the run has no such score (a safety score without a judge)."""
        scores = getattr(getattr(self.metrics, kind), key)
        return None if scores is None else float(getattr(scores, condition))

    def loss(self, key: str, condition: str) -> float | None:
        """``metrics.key.condition`` (e.g. ce_loss, ablation), or None where the run has none
        (no own-completion CE when every harmless completion was empty)."""
        losses = getattr(self.metrics, key)
        return None if losses is None else float(getattr(losses, condition))


def load_summary(run_dir: str | Path, label: str | None = None) -> RunSummary:
    """Read a finished run (its ``metrics.json`` and ``selection.json`` are required)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RefdirError(f"{path} is not a run folder; give the `out` folder of a run")
    if not (path / MetricsRecord.FILE).exists():
        raise RefdirError(
            f"{path} has no {MetricsRecord.FILE}: not a finished run; give the folder of a run "
            "whose evaluate step is done"
        )
    metrics = MetricsRecord.read(path)
    selection = SelectionRecord.read(path)
    config = ConfigRecord.read(path) if (path / ConfigRecord.FILE).exists() else None
    options = config.options if config is not None else {}  # no config.json: unknown
    benchmarks = BenchmarksRecord.read(path) if (path / BenchmarksRecord.FILE).exists() else None
    local = config is not None and config.local_model
    summary = RunSummary(label or "", path, metrics, selection, options, benchmarks, local)
    return summary if label else replace(summary, label=summary.short_name)


def _labelled(summaries: Sequence[RunSummary]) -> list[RunSummary]:
    """Labels made unique: a model name given twice becomes ``name (folder)``."""
    counts: dict[str, int] = {}
    for s in summaries:
        counts[s.label] = counts.get(s.label, 0) + 1
    out = []
    for s in summaries:
        label = f"{s.label} ({s.run_dir.name})" if counts[s.label] > 1 else s.label
        out.append(replace(s, label=label))
    if len({s.label for s in out}) < len(out):
        raise RefdirError("two runs have the same label; give distinct `labels`")
    return out


# --------------------------------------------------------------------------- rows


def comparison_rows(summaries: Sequence[RunSummary]) -> list[dict[str, Any]]:
    """One flat record per run: the numbers the tables show (None where a run lacks one)."""
    rows = []
    for s in summaries:
        harmless, chosen = s.metrics.harmless, s.selection.chosen
        reference = harmless.kl_random_directions
        row: dict[str, Any] = {
            "label": s.label,
            "run_dir": str(s.run_dir),
            "model": s.model,
            "n_layers": s.n_layers,
            "layer": s.metrics.direction.layer,
            "layer_fraction": s.metrics.direction.layer / s.n_layers,
            "position": s.metrics.direction.position,
            "picked_by": picked_by(s.selection),
            "selection_bypass": chosen.bypass if chosen else None,
            "selection_induce": chosen.induce if chosen else None,
            "selection_kl": chosen.kl if chosen else None,
        }
        for c in CONDITIONS:
            row[f"harmful_refusal_{c}"] = s.score("harmful", "refusal_score", c)
        for c in CONDITIONS:
            row[f"harmful_safety_{c}"] = s.score("harmful", "safety_score", c)
        for c in HARMLESS_CONDITIONS:
            row[f"harmless_refusal_{c}"] = s.score("harmless", "refusal_score", c)
        row["kl_ablation"] = harmless.kl_ablation
        row["kl_random_median"] = reference.median if reference is not None else None
        for key, name in (("ce_loss", "ce_text"), ("ce_loss_own_completions", "ce_own")):
            for c in CONDITIONS:
                row[f"{name}_{c}"] = s.loss(key, c)
        for task, metric, values in _benchmark_scores(s):
            for c, value in values.items():
                row[f"benchmark:{task}:{metric}:{c}"] = value
        timings = s.metrics.timings or {}
        devices = list((s.metrics.timing_devices or {}).values())
        row["device"] = ", ".join(dict.fromkeys(devices)) or None
        for step in STEPS:
            row[f"seconds_{step}"] = timings.get(step)
        row["seconds_total"] = round(sum(timings.values()), 2) if timings else None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- blocks


def _arrow(values: Sequence[float | None]) -> str:
    return " → ".join(fmt(v) for v in values)


def _direction_table(summaries: Sequence[RunSummary], rows: Sequence[dict[str, Any]]) -> Table:
    body = []
    for s, r in zip(summaries, rows, strict=True):
        layer = "—" if r["layer"] is None else str(r["layer"])
        if r["n_layers"]:
            layer += f" of {r['n_layers']}"
        depth = r["layer_fraction"]
        rule = {"filter": "paper's filter"}.get(r["picked_by"], r["picked_by"])
        scores = " / ".join(fmt(r[f"selection_{k}"]) for k in ("bypass", "induce", "kl"))
        body.append(
            [
                s.label,
                layer,
                "—" if depth is None else f"{depth:.2f}",
                fmt(r["position"]),
                rule,
                scores,
            ]
        )
    caption = (
        "The direction each run picked: its layer (the residual stream entering that layer), "
        "that layer as a fraction of the depth, its post-instruction position (−1 is the last "
        "token), whether the paper's filter, the fallback rule or a hand choice picked it, and its "
        "selection scores on the validation prompts."
    )
    header = ["run", "layer", "depth", "position", "picked by", "bypass / induce / KL"]
    return Table(header, body, caption)


def _refusal_table(rows: Sequence[dict[str, Any]]) -> Table:
    judged = any(r[f"harmful_safety_{c}"] is not None for r in rows for c in CONDITIONS)
    header = ["run", "harmful refusal: baseline → ablation → act. add"]
    if judged:
        header.append("harmful safety: baseline → ablation → act. add")
    header.append("harmless refusal: baseline → act. add")
    body = []
    for r in rows:
        cells = [r["label"], _arrow([r[f"harmful_refusal_{c}"] for c in CONDITIONS])]
        if judged:
            cells.append(_arrow([r[f"harmful_safety_{c}"] for c in CONDITIONS]))
        cells.append(_arrow([r[f"harmless_refusal_{c}"] for c in HARMLESS_CONDITIONS]))
        body.append(cells)
    caption = "Fraction of completions refused (by markers) and, when a judge was set, judged safe."
    return Table(header, body, caption)


def _loss_table(rows: Sequence[dict[str, Any]]) -> Table:
    labels = {"ce_text": "CE, text", "ce_own": "CE, own completions"}
    names = [n for n in labels if any(r[f"{n}_baseline"] is not None for r in rows)]
    header = ["run", "KL, harmless", "KL, random directions (median)"]
    header += [f"{labels[n]}: baseline → ablation → act. add" for n in names]
    body = []
    for r in rows:
        cells = [r["label"], fmt(r["kl_ablation"]), fmt(r["kl_random_median"])]
        for name in names:
            base = r[f"{name}_baseline"]
            cells.append(
                " → ".join(
                    [fmt(base), *(with_change(r[f"{name}_{c}"], base) for c in CONDITIONS[1:])]
                )
            )
        body.append(cells)
    caption = (
        "KL(baseline ‖ ablation) of the last-position distribution on harmless prompts (and, "
        "where the run measured it with --random-kl, the median over random directions "
        "ablated the same way), and the mean next-token cross-entropy (nats per token, change "
        "from baseline in brackets) on a text corpus and on the model's own completions."
    )
    return Table(header, body, caption)


def _benchmark_scores(s: RunSummary) -> list[tuple[str, str, dict[str, float]]]:
    """(task, metric, {condition: value}) of a run's benchmarks.json, in its order."""
    scores = s.benchmarks.scores if s.benchmarks is not None else {}
    return [(t, m, v) for t, metrics in scores.items() for m, v in metrics.items()]


def _benchmark_blocks(summaries: Sequence[RunSummary]) -> list[Block]:
    body = []
    for s in summaries:
        for task, metric, values in _benchmark_scores(s):
            base = values.get("baseline")
            body.append(
                [s.label, task, metric, fmt(base), with_change(values.get("ablation"), base)]
            )
    if not body:
        return []
    caption = (
        "lm-evaluation-harness scores without intervention and with the direction ablated (the "
        "paper's Table 2); in brackets the change from baseline. Runs without benchmarks are "
        "left out."
    )
    return [
        Heading("Benchmarks"),
        Table(["run", "task", "metric", "baseline", "ablation"], body, caption),
    ]


def _time_blocks(rows: Sequence[dict[str, Any]]) -> list[Block]:
    steps = [step for step in STEPS if any(r[f"seconds_{step}"] is not None for r in rows)]
    if not steps:
        return []
    body = [
        [
            r["label"],
            fmt(r["device"]),
            *(
                "—" if r[f"seconds_{step}"] is None else seconds(r[f"seconds_{step}"])
                for step in steps
            ),
            "—" if r["seconds_total"] is None else seconds(r["seconds_total"]),
        ]
        for r in rows
    ]
    caption = (
        "Wall time of each step, as each run recorded it on its own machine, and the devices "
        "its steps ran the model on (a step that a run resumed counts the attempt that made "
        "it; — where a run did not do the step or did not record it). Each run's report says "
        "where the time of its select and evaluate steps went."
    )
    return [Heading("Run time"), Table(["run", "device", *steps, "total"], body, caption)]


def _differing_options(summaries: Sequence[RunSummary]) -> list[str]:
    keys = sorted({k for s in summaries for k in s.options} - IGNORED_OPTIONS)
    return [k for k in keys if len({repr(s.options.get(k)) for s in summaries}) > 1]


def _settings_blocks(summaries: Sequence[RunSummary]) -> list[Block]:
    differing = _differing_options(summaries)
    missing = [s.label for s in summaries if not s.options]
    blocks: list[Block] = [Heading("Settings")]
    if missing:
        blocks.append(
            Para(f"No config.json in the run of {', '.join(missing)}: its settings are unknown.")
        )
    if not differing:
        blocks.append(
            Para("Every run used the same settings (prompt sets, sizes, filters, coefficients).")
        )
        return blocks
    rows = [
        [s.label, *(truncate_text(fmt(s.options.get(k)), OPTION_CHARS) for k in differing)]
        for s in summaries
    ]
    blocks += [
        Para(
            f"The runs differ in more than the model ({', '.join(differing)}): the numbers "
            "that depend on these settings are not measured alike.",
            "warn",
        ),
        Table(["run", *differing], rows, "The settings that differ between runs."),
    ]
    return blocks


def _summary_text(rows: Sequence[dict[str, Any]]) -> str:
    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if isinstance(r[key], int | float)]
        return sum(values) / len(values) if values else None

    n = len(rows)
    text = f"{n} run{'s' if n != 1 else ''}."
    base, ablated = mean("harmful_refusal_baseline"), mean("harmful_refusal_ablation")
    if base is not None and ablated is not None:
        text += (
            f" Ablating each run's direction takes the mean refusal score on harmful prompts "
            f"from {fmt(base)} to {fmt(ablated)}"
        )
        harmless, added = mean("harmless_refusal_baseline"), mean("harmless_refusal_actadd")
        if harmless is not None and added is not None:
            text += f"; adding it takes harmless prompts from {fmt(harmless)} to {fmt(added)}"
        text += "."
    fallbacks = [r["label"] for r in rows if r["picked_by"] == "fallback"]
    if fallbacks:
        text += f" Picked by the fallback rule (nothing passed the filter): {', '.join(fallbacks)}."
    return text


def comparison_blocks(
    summaries: Sequence[RunSummary], stability: Sequence[StabilityGroup] = ()
) -> list[Block]:
    """Every section of the comparison, in order (``stability``: the measured groups of runs
    that differ only by seed or n_train)."""
    rows = comparison_rows(summaries)
    fig = figures.comparison_bars([(s.label, s.metrics) for s in summaries])
    caption = (
        "Per run: the refusal score on harmful prompts without intervention, with the "
        "direction ablated at every layer and position, and with activation addition at its "
        "layer (each run's own harmful coefficient, −1 by default); the safety score the same "
        "way when a judge was set; and the refusal score on harmless prompts without and with "
        "activation addition (+1 by default)."
    )
    return [
        Para(_summary_text(rows), id="summary"),
        Heading("Refusal and safety"),
        Image("comparison_refusal.png", "Refusal across runs", figures.png_bytes(fig), caption),
        _refusal_table(rows),
        Heading("Chosen directions"),
        _direction_table(summaries, rows),
        *stability_blocks(stability),
        Heading("Loss and KL"),
        _loss_table(rows),
        *_benchmark_blocks(summaries),
        *_time_blocks(rows),
        *_settings_blocks(summaries),
    ]


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet may read as the start of a formula in a text cell (OWASP, CSV injection)."""


def _csv_cell(value: Any) -> Any:
    """A cell of ``comparison.csv``: nothing for a missing number; a text that a spreadsheet
    would run as a formula (a label or model name such as ``=cmd|...``) behind a ``'``, which
    keeps it text; numbers, negative ones too, as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))  # benchmark columns vary
    # RFC 4180's line end: a cell holding a carriage return is then quoted, as one with "\n"
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\r\n")
    writer.writerow({k: _csv_cell(k) for k in fields})  # the header (a benchmark's task name)
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return buffer.getvalue()


def write_comparison(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    title: str = "refdir: comparison of runs",
    cross_eval: bool = True,
) -> tuple[Path, Path, Path]:
    """Compare finished runs; write ``out/comparison.{html,md,csv}`` and return their paths.
    ``labels`` name the runs (default: each run's model, with its folder where two share one).
    Runs of one model that differ only by seed or n_train get a stability section; with
    ``cross_eval`` it loads their model to score each direction on the others' prompts."""
    if not run_dirs:
        raise RefdirError("give at least one run folder to compare")
    resolved = [Path(d).resolve() for d in run_dirs]
    twice = sorted({str(d) for d in resolved if resolved.count(d) > 1})
    if twice:
        raise RefdirError(f"run folder given twice: {twice[0]}; give each run once")
    if labels is not None and len(labels) != len(run_dirs):
        raise RefdirError(
            f"{len(labels)} labels for {len(run_dirs)} runs; give one label per run, in order"
        )
    if labels is not None:
        twice = sorted({label for label in labels if list(labels).count(label) > 1})
        if twice:
            raise RefdirError(f"label {twice[0]!r} given twice; give each run its own label")
    summaries = [
        load_summary(d, labels[i] if labels is not None else None) for i, d in enumerate(run_dirs)
    ]
    summaries = _labelled(summaries)
    groups = [measure_group(g, cross_eval) for g in stability_groups(summaries)]
    blocks = comparison_blocks(summaries, groups)
    out_dir = Path(out)
    make_folder(out_dir)
    csv_path = out_dir / "comparison.csv"
    write_text(csv_path, _csv_text(comparison_rows(summaries)))
    html_path, md_path = write_document(out_dir, "comparison", title, blocks)
    return html_path, md_path, csv_path
