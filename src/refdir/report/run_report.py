"""The report of a ``refdir run``: ``report.html`` (self-contained: figures embedded as base64
PNG, inline CSS, no script) and ``report.md`` beside it (figures under ``figures/``). Every
section is a function of the run's typed files that returns blocks."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from refdir.artifacts.run import Completion
from refdir.artifacts.selection import SelectionRecord
from refdir.errors import RefdirError
from refdir.report import figures
from refdir.report.blocks import (
    Block,
    Heading,
    Image,
    Para,
    Sample,
    Samples,
    Table,
    fmt,
    key_value_table,
    seconds,
    truncate_text,
    with_change,
)
from refdir.report.render import write_document
from refdir.report.run_data import SAMPLES_PER_CONDITION, RunData, load_run
from refdir.report.suffix_section import suffix_section

__all__ = ["CONDITIONS", "build_blocks", "picked_by", "write_report"]

CONDITIONS = figures.CONDITIONS
PROMPT_CHARS = 160
OPTION_CHARS = 120


def picked_by(selection: SelectionRecord) -> str:
    """How a run's direction was picked: ``manual`` (by hand: ``layer`` and ``position``),
    ``fallback`` (the fallback rule, when no candidate passed the paper's filter) or
    ``filter`` (the paper's rule)."""
    if selection.rule.startswith("manual"):
        return "manual"
    if selection.fallback is True or selection.n_passed == 0:
        return "fallback"
    return "filter"


def _position_text(position: int) -> str:
    if position == -1:
        return "-1 (the last post-instruction token)"
    return f"{position} ({-position - 1} tokens before the last post-instruction token)"


def _filter_text(selection: SelectionRecord) -> str:
    f = selection.filters
    eps = " (scored with the paper's code's epsilons)" if f.epsilons else ""
    return f"KL ≤ {f.kl_max:g}, induce ≥ {f.induce_min:g}, {f.layer_text}{eps}"


def _summary(run: RunData) -> list[Block]:
    d, harmful = run.direction, run.metrics.harmful.refusal_score
    harmless = run.metrics.harmless.refusal_score
    n = run.selection.n_candidates
    how = {
        "manual": f"chosen by hand among {n} candidates.",
        "fallback": f"picked from {n} candidates by a fallback rule "
        "(nothing passed the paper's filter).",
        "filter": f"picked from {n} candidates.",
    }[picked_by(run.selection)]
    text = (
        f"Refusal direction of {run.metrics.model}: layer {d.layer}, position {d.position}, "
        f"norm {d.norm:.3g}, {how} Ablating it moves the refusal score on harmful prompts "
        f"from {fmt(harmful.baseline)} to {fmt(harmful.ablation)}. Adding it moves the "
        f"refusal score on harmless prompts from {fmt(harmless.baseline)} to "
        f"{fmt(harmless.actadd)}."
    )
    long = run.metrics.harmful.refusal_score_long
    if long is not None:
        text += (
            f" Counted on {long.max_new_tokens}-token completions, the ablation leaves a "
            f"refusal score of {fmt(long.ablation)} on harmful prompts."
        )
    if harmless.ablation is not None:
        text += f" Under ablation, harmless prompts are refused at {fmt(harmless.ablation)}."
    thinking = run.metrics.reasoning
    if thinking is not None:
        text += (
            f" The chat template thinks: completions got {thinking.max_new_tokens} new tokens "
            f"instead of {thinking.instead_of}, refusal scores count the answers after the think "
            "block, and a completion cut off inside it counts as no answer."
        )
    if run.metrics.protocol == "paper":
        text += (
            " Run under the paper protocol: the paper's code wherever its text and code differ "
            "(see the run's configuration)."
        )
    return [Para(text, id="summary")]


def _reasoning_table(run: RunData) -> list[Block]:
    """A reasoning model's think blocks: no answers, and refusal markers in the reasoning."""
    thinking = run.metrics.reasoning
    if thinking is None:
        return []
    rows = [
        [f"{group}, {condition}", fmt(rate), fmt(thinking.reasoning_refusal[group].get(condition))]
        for group, conditions in thinking.no_answer.items()
        for condition, rate in conditions.items()
    ]
    opened = "opens" if thinking.opened_by_template else "leaves the model to open"
    return [
        Table(
            ["prompts, condition", "no answer", "refusal markers in the reasoning"],
            rows,
            f"The chat template {opened} a think block. No answer: the completion was cut off "
            f"inside the reasoning at {thinking.max_new_tokens} tokens (counted neither as a "
            "refusal nor as compliance). The reasoning's refusal markers are counted apart from "
            "the answer's, which the refusal scores count.",
        )
    ]


def _direction_section(run: RunData) -> list[Block]:
    d, chosen = run.direction, run.selection.chosen
    scores = " / ".join(
        fmt(getattr(chosen, k) if chosen else None) for k in ("bypass", "induce", "kl")
    )
    rows = [
        ["model", run.metrics.model],
        [
            "layer",
            f"{d.layer} of {run.candidates.n_layers} (residual stream input of layer {d.layer})",
        ],
        ["position", _position_text(d.position)],
        ["norm", f"{d.norm:.4g}"],
        ["d_model", str(d.d_model)],
        ["bypass / induce / KL", scores],
        [
            "candidates (passed the filter)",
            f"{run.selection.n_candidates} ({run.selection.n_passed})",
        ],
        ["selection rule", run.selection.rule],
        ["prompts (harmful / harmless)", f"{fmt(d.n_harmful)} / {fmt(d.n_harmless)}"],
    ]
    blocks: list[Block] = [Heading("Chosen direction"), Table(["", ""], rows, id="chosen")]
    how = picked_by(run.selection)
    if how == "manual":
        blocks.append(
            Para(
                "Chosen by hand (layer and position), not by the paper's filter "
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
    if chosen is not None and (chosen.layer, chosen.position) != (d.layer, d.position):
        blocks.append(
            Para(
                f"direction.json (layer {d.layer}, position {d.position}) differs from the "
                f"candidate chosen in selection.json (layer {chosen.layer}, position "
                f"{chosen.position}).",
                "warn",
            )
        )
    return blocks


def _selection_section(run: RunData) -> list[Block]:
    fig = figures.selection_heatmaps(run.selection, run.candidates.n_layers)
    baseline = run.selection.baseline
    caption = (
        "Scores of every candidate (rows: post-instruction positions; columns: layers). "
        "Bypass and induce are mean refusal log-odds (red: refuses, blue: complies); the black "
        "line on their colour bars is the baseline without intervention "
        f"(harmful_val {fmt(baseline.harmful_val)}, harmless_val "
        f"{fmt(baseline.harmless_val)}). Hatched cells were not scored: a zero difference "
        "of means, or a score the pick cannot use: KL of a candidate already out by its induce, "
        "bypass of one out by its induce or KL, every score past the layer filter "
        "(score_all scores every cell); the pale region behind the dashed line is excluded by "
        "the layer filter; dots mark candidates passing every filter "
        f"({_filter_text(run.selection)}); the framed cell is the chosen candidate."
    )
    return [
        Heading("Selection"),
        Image("selection_heatmaps.png", "Selection scores", figures.png_bytes(fig), caption),
    ]


def _refusal_section(run: RunData) -> list[Block]:
    fig = figures.refusal_bars(run.metrics)
    coefficients = run.metrics.coefficients
    caption = (
        "Fraction of completions scored as refusals (and judged safe, when a judge was set). "
        "Harmful: baseline, the direction ablated at every layer, and activation addition with "
        f"coefficient {coefficients.harmful_actadd:+g} at its layer. Harmless: baseline and "
        f"activation addition with {coefficients.harmless_actadd:+g}."
    )
    blocks: list[Block] = [
        Heading("Refusal and safety scores"),
        Image("refusal_scores.png", "Refusal scores", figures.png_bytes(fig), caption),
    ]
    rows = [
        [name, *(fmt(getattr(scores, c)) for c in CONDITIONS)]
        for name, scores in run.metrics.harmful.by_set.items()
    ]
    long = run.metrics.harmful.refusal_score_long
    caption = "Refusal score per harmful evaluation set."
    header = ["harmful set", *CONDITIONS]
    if long is not None:
        header.append(f"ablation, {long.max_new_tokens} tokens")
        rows = [[*row, fmt(long.by_set.get(row[0]))] for row in rows]
        caption += (
            f" The last column counts the ablation's refusals on completions of "
            f"{long.max_new_tokens} tokens, where a refusal after a first sentence shows; "
            "markers can miss those on short completions."
        )
    blocks.append(Table(header, rows, caption))
    harmless = run.metrics.harmless.refusal_score
    if harmless.ablation is not None:
        rows = [[c, fmt(getattr(harmless, c))] for c in ("baseline", "ablation", "actadd")]
        blocks.append(
            Table(
                ["harmless prompts", "refusal score"],
                rows,
                "Refusal score on harmless prompts: at baseline, with the direction ablated "
                "(false refusals the ablation may create) and with activation addition.",
            )
        )
    blocks.extend(_reasoning_table(run))
    for name, categories in (run.metrics.harmful.by_category or {}).items():
        rows = [
            [category, *(fmt(getattr(scores, c)) for c in CONDITIONS)]
            for category, scores in categories.items()
        ]
        blocks.append(
            Table(
                [f"{name}: category", *CONDITIONS],
                rows,
                f"Refusal score per category of {name} (as the paper's code reports it).",
            )
        )
    return blocks


def _loss_section(run: RunData) -> list[Block]:
    metrics = run.metrics
    rows = []
    for condition in CONDITIONS:
        cells = []
        for ce in (metrics.ce_loss, metrics.ce_loss_own_completions):
            if ce is None:
                cells.append(fmt(None))
                continue
            value, base = getattr(ce, condition), ce.baseline
            cells.append(fmt(value) if condition == "baseline" else with_change(value, base))
        rows.append([condition, *cells])
    harmless = metrics.harmless
    rows.append(["KL(baseline ‖ ablation), harmless", fmt(harmless.kl_ablation), ""])
    reference = harmless.kl_random_directions
    if reference is not None:
        label = f"the same, median of {reference.n} random directions"
        rows.append([label, fmt(reference.median), ""])
    caption = (
        "Mean next-token cross-entropy (nats per token; in brackets the change from baseline) "
        "under each condition, on a plain-text corpus and on the model's own baseline "
        "completions of harmless prompts. A large rise means the intervention damages the "
        "model. The KL row is the KL divergence of the last-position distribution on harmless "
        "prompts when the direction is ablated"
        + (", and the row below it the same for random directions." if reference else ".")
    )
    if metrics.ce_loss_own_completions is None:
        caption += " Every baseline completion of a harmless prompt was empty: no CE on them."
    spread = harmless.kl_ablation_spread
    groups = []
    for group, label in (
        (spread.refused_at_baseline, "refused"),
        (spread.answered_at_baseline, "answered"),
    ):
        if group.n:
            noun = "prompt" if group.n == 1 else "prompts"
            groups.append(f"{fmt(group.mean)} on the {group.n} {noun} {label} at baseline")
    caption += (
        f" Per prompt, that KL has median {fmt(spread.median)}, 90th percentile "
        f"{fmt(spread.p90)} and maximum {fmt(spread.max)}"
        + (f"; its mean is {' and '.join(groups)}." if groups else ".")
    )
    if reference is not None:
        caption += (
            f" Ablating {reference.n} random directions instead (seed {reference.seed}) costs "
            f"a KL of median {fmt(reference.median)} (10th to 90th percentile "
            f"{fmt(reference.p10)} to {fmt(reference.p90)}); the chosen direction costs more "
            f"than {100 * reference.below_chosen:.0f}% of them."
        )
    header = ["condition", "CE loss, text corpus", "CE loss, own completions"]
    return [Heading("Loss and KL"), Table(header, rows, caption)]


def _benchmark_section(run: RunData) -> list[Block]:
    if run.benchmarks is None or not run.benchmarks.scores:
        return []
    rows = []
    for task, metrics in run.benchmarks.scores.items():
        for metric, values in metrics.items():
            base = values.get("baseline")
            rows.append([task, metric, fmt(base), with_change(values.get("ablation"), base)])
    limit = run.benchmarks.limit
    caption = (
        "lm-evaluation-harness scores of the model as it is and with the direction ablated at "
        "every layer and position (the same model as the orthogonalized checkpoint where the "
        "weight edit is exact: the paper's Table 2); in brackets the change from baseline"
        + (f"; at most {limit} items per task." if limit else ".")
    )
    return [Heading("Benchmarks"), Table(["task", "metric", "baseline", "ablation"], rows, caption)]


def _cosine_section(run: RunData) -> list[Block]:
    d, cands = run.direction, run.candidates
    fig = figures.cosine_curves(cands.diffs.numpy(), d.vector.double().numpy(), d.layer, d.position)
    caption = (
        "Cosine similarity between the chosen direction and the difference-of-means candidate "
        "at every layer, one line per post-instruction position. A broad plateau means the "
        "same direction is present over many layers; the star is the chosen candidate (1 by "
        "construction)."
    )
    p = cands.positions.index(d.position) if d.position in cands.positions else -1
    projection = figures.projection_curves(
        cands.harmful_mean[p].numpy(),
        cands.harmless_mean[p].numpy(),
        d.vector.double().numpy(),
        d.layer,
    )
    projection_caption = (
        f"The residual stream at position {d.position}, averaged over the training prompts "
        f"({cands.n_harmful} harmful, {cands.n_harmless} harmless), projected onto the chosen "
        "direction (unit length) at every layer. The shaded gap is the difference of means "
        "along the direction: it opens where the model starts to tell the two kinds of prompt "
        "apart along it."
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
    harmless = name in run.metrics.sizes.harmless_eval or "harmless" in name
    return "harmless" if harmless else "harmful"


def _samples(rows: Iterable[Completion], truncate: int) -> list[Sample]:
    return [
        Sample(
            truncate_text(row.prompt, PROMPT_CHARS),
            truncate_text(row.completion, truncate),
            row.refusal,
        )
        for row in list(rows)[:SAMPLES_PER_CONDITION]
    ]


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
    names = sorted({name for name, _ in run.completions})
    for name in sorted(names, key=lambda n: (_set_kind(run, n) != "harmful", n)):
        blocks.append(Heading(f"{name} ({_set_kind(run, name)})", 3))
        conditions = [c for c in CONDITIONS if (name, c) in run.completions]
        conditions += sorted(c for n, c in run.completions if n == name and c not in CONDITIONS)
        for condition in conditions:
            blocks.append(
                Samples(condition, _samples(run.completions[(name, condition)], truncate))
            )
    return blocks


def _run_section(run: RunData) -> list[Block]:
    blocks: list[Block] = [Heading("Run")]
    if run.config is not None:
        options = run.config.run
        shown = {  # a chat template or system prompt is long: config.json has it whole
            k: truncate_text(v, OPTION_CHARS) if isinstance(v, str) else v
            for k, v in options.items()
        }
        caption = (
            f"Text options are cut to {OPTION_CHARS} characters; config.json has them whole."
            if shown != options
            else ""
        )
        blocks += [Heading("Configuration", 3), key_value_table(shown, caption)]
        blocks += [Heading("Library versions", 3), key_value_table(run.config.versions)]
    blocks += [Heading("Sizes", 3), key_value_table(run.metrics.sizes.model_dump())]
    timings = run.metrics.timings or {}
    if timings:
        parts = run.metrics.timing_parts or {}
        rows = []
        for step, value in timings.items():
            rows.append([step, seconds(value)])
            rows += [[f"· {name}", seconds(t)] for name, t in parts.get(step, {}).items()]
        rows.append(["total", seconds(sum(timings.values()))])
        caption = (
            "Rows marked · are timed parts of the step above them; the rest of a step's "
            "time is loading the model, reading and writing files, and bookkeeping."
            if parts
            else ""
        )
        blocks += [Heading("Wall time per step", 3), Table(["step", "wall time"], rows, caption)]
    return blocks


def build_blocks(run: RunData, truncate: int) -> list[Block]:
    """Every section of the report, in order."""
    return [
        *_summary(run),
        *_direction_section(run),
        *_selection_section(run),
        *_refusal_section(run),
        *_loss_section(run),
        *_benchmark_section(run),
        *_cosine_section(run),
        *_completions_section(run, truncate),
        *_run_section(run),
        *(suffix_section(run.suffix) if run.suffix is not None else []),
    ]


def write_report(run_dir: str | Path, truncate: int = 200) -> tuple[Path, Path]:
    """Write ``run_dir/report.html`` (self-contained) and ``run_dir/report.md`` with its
    ``figures/*.png``; return (html, md). Completions are cut to ``truncate`` characters."""
    if truncate < 1:
        raise RefdirError(f"`truncate` must be a positive number of characters, got {truncate}")
    run = load_run(run_dir)
    blocks = build_blocks(run, truncate)
    return write_document(run.run_dir, "report", f"refdir report: {run.metrics.model}", blocks)
