"""The report of a `refdir run`: ``report.html`` (self-contained: figures embedded as base64
PNG, inline CSS, no script) and ``report.md`` beside it (figures under ``figures/``).

The report is built as a short list of blocks (headings, paragraphs, tables, figures,
completion samples) rendered twice, once to HTML and once to markdown, so both say the same.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refdir import figures
from refdir.direction import Candidates, Direction, atomic_path
from refdir.errors import RefdirError

__all__ = [
    "RunData",
    "build_blocks",
    "is_fallback",
    "load_run",
    "render_markdown",
    "truncate_text",
    "write_report",
]

STEP_OF = {"config.json": "config", "prompts.json": "prompts", "selection.json": "select"}
CONDITIONS = ("baseline", "ablation", "actadd")
SAMPLES_PER_CONDITION = 3
PROMPT_CHARS = 160
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
}


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


def _fix(run_dir: Path) -> str:
    return f"run `refdir run --out {run_dir}` first"


def _redo(run_dir: Path, step: str) -> str:
    return f"rerun `refdir run --out {run_dir} --force {step}`"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _read_json(path: Path, run_dir: Path, required: bool) -> dict[str, Any]:
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
    metrics = _read_json(run_dir / "metrics.json", run_dir, required=True)
    selection = _read_json(run_dir / "selection.json", run_dir, required=True)
    cands = _load_candidates(run_dir)
    return RunData(
        run_dir=run_dir,
        metrics=metrics,
        selection=selection,
        candidates=cands,
        direction=_load_direction(run_dir, selection, cands),
        config=_read_json(run_dir / "config.json", run_dir, required=False),
        prompts=_read_json(run_dir / "prompts.json", run_dir, required=False),
        completions=_load_completions(run_dir),
    )


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str
    kind: str = ""  # "", "note" or "warn"


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    name: str  # file name under figures/
    alt: str
    png: bytes
    caption: str


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str
    refusal: bool | None


@dataclass(frozen=True)
class Samples:
    title: str
    items: Sequence[Sample]


@dataclass(frozen=True)
class Raw:
    html: str
    md: str


Block = Heading | Para | Table | Image | Samples | Raw


# --------------------------------------------------------------------------- formatting


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0.0 or abs(value) >= 1e-3:
            return f"{value:.3f}" if math.isfinite(value) else str(value)
        return f"{value:.2e}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return _fmt(value)
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(float(value), 60.0)
    return f"{int(minutes)} min {seconds:.0f} s"


def truncate_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters (plus an ellipsis when cut)."""
    if len(text) <= limit:
        return text
    return text[:limit].rstrip() + "…"


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, name + "."))
        else:
            rows.append((name, value))
    return rows


def _position_text(position: int) -> str:
    if position == -1:
        return "-1 (the last post-instruction token)"
    return f"{position} ({-position - 1} tokens before the last post-instruction token)"


# --------------------------------------------------------------------------- sections


def _grid_count(grid: Any, test: Callable[[Any], bool]) -> int:
    return sum(1 for row in grid or [] for value in row if test(value))


def _count(run: RunData, key: str) -> int | None:
    """``n_candidates`` / ``n_passed`` as recorded in selection.json or metrics.json."""
    for source in (run.selection, run.metrics.get("selection") or {}):
        if isinstance(source.get(key), int):
            return int(source[key])
    return None


def _n_candidates(run: RunData) -> int:
    counted = _grid_count(run.selection.get("induce"), lambda v: v is not None)
    return _count(run, "n_candidates") or counted


def _n_passed(run: RunData) -> int | None:
    if run.selection.get("passed"):
        return _grid_count(run.selection["passed"], lambda v: v is True)
    return _count(run, "n_passed")


def is_fallback(run: RunData) -> bool:
    """True when the pick did not come from the paper's filter: selection.json says
    ``"fallback": true``, a rule names a fallback, or no candidate passed the filter."""
    rules = [
        str(run.selection.get("rule", "")),
        str((run.metrics.get("selection") or {}).get("rule", "")),
    ]
    flagged = run.selection.get("fallback") is True
    return flagged or any("fallback" in r.lower() for r in rules) or _n_passed(run) == 0


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
        f"position {d.position}, norm {d.norm:.3g}, picked from {_n_candidates(run)} candidates"
        + (" by a fallback rule (nothing passed the paper's filter)." if is_fallback(run) else ".")
    )
    if "baseline" in harmful and "ablation" in harmful:
        text += (
            f" Ablating it moves the refusal score on harmful prompts from "
            f"{_fmt(harmful['baseline'])} to {_fmt(harmful['ablation'])}."
        )
    if "baseline" in harmless and "actadd" in harmless:
        text += (
            f" Adding it moves the refusal score on harmless prompts from "
            f"{_fmt(harmless['baseline'])} to {_fmt(harmless['actadd'])}."
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
            " / ".join(_fmt(chosen.get(k)) for k in ("bypass", "induce", "kl")),
        ],
        ["candidates (passed the filter)", f"{_n_candidates(run)} ({_fmt(_n_passed(run))})"],
        ["selection rule", str(run.selection.get("rule", "—"))],
        ["prompts (harmful / harmless)", f"{_fmt(d.n_harmful)} / {_fmt(d.n_harmless)}"],
    ]
    blocks: list[Block] = [Heading("Chosen direction"), Table(["", ""], rows)]
    if is_fallback(run):
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
        f"(harmful_val {_fmt(baseline.get('harmful_val'))}, harmless_val "
        f"{_fmt(baseline.get('harmless_val'))}). Hatched cells were not scored: a zero difference "
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
        rows = [[name, *(_fmt(s.get(c)) for c in CONDITIONS)] for name, s in by_set.items()]
        blocks.append(
            Table(["harmful set", *CONDITIONS], rows, "Refusal score per harmful evaluation set.")
        )
    return blocks


CE_COLUMNS = {
    "ce_loss": "CE loss, text corpus",
    "ce_loss_own_completions": "CE loss, own completions",
}


def _with_delta(value: Any, base: Any, is_baseline: bool) -> str:
    if is_baseline or not isinstance(value, int | float) or not isinstance(base, int | float):
        return _fmt(value)
    return f"{_fmt(value)} ({value - base:+.3f})"


def _loss_section(run: RunData) -> list[Block]:
    columns = [k for k in CE_COLUMNS if run.metrics.get(k)] or ["ce_loss"]
    rows = []
    for condition in CONDITIONS:
        cells = []
        for key in columns:
            ce = run.metrics.get(key) or {}
            cells.append(
                _with_delta(ce.get(condition), ce.get("baseline"), condition == "baseline")
            )
        rows.append([condition, *cells])
    harmless = run.metrics.get("harmless") or {}
    blank = [""] * (len(columns) - 1)
    rows.append(["KL(baseline ‖ ablation), harmless", _fmt(harmless.get("kl_ablation")), *blank])
    reference = harmless.get("kl_random_directions")
    if reference:
        label = f"the same, median of {reference.get('n')} random directions"
        rows.append([label, _fmt(reference.get("median")), *blank])
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


def _kl_spread_text(spread: dict[str, Any]) -> str:
    groups = []
    for key, label in (("refused_at_baseline", "refused"), ("answered_at_baseline", "answered")):
        group = spread.get(key) or {}
        if group.get("n"):
            noun = "prompt" if group["n"] == 1 else "prompts"
            groups.append(
                f"{_fmt(group.get('mean'))} on the {group['n']} {noun} {label} at baseline"
            )
    text = (
        f"Per prompt, that KL has median {_fmt(spread.get('median'))}, 90th percentile "
        f"{_fmt(spread.get('p90'))} and maximum {_fmt(spread.get('max'))}"
    )
    return text + (f"; its mean is {' and '.join(groups)}." if groups else ".")


def _kl_reference_text(reference: dict[str, Any]) -> str:
    below = reference.get("below_chosen")
    share = f"{100 * below:.0f}%" if isinstance(below, int | float) else "?"
    return (
        f"Ablating {reference.get('n')} random directions instead (seed {reference.get('seed')}) "
        f"costs a KL of median {_fmt(reference.get('median'))} (10th to 90th percentile "
        f"{_fmt(reference.get('p10'))} to {_fmt(reference.get('p90'))}); the chosen direction "
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
    return [
        Heading("Cosine similarity across layers"),
        Image("cosine_similarity.png", "Cosine similarity", figures.png_bytes(fig), caption),
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


def _key_value_table(data: Mapping[str, Any], caption: str = "") -> Table:
    return Table(["", ""], [[key, _fmt(value)] for key, value in _flatten(data)], caption)


def _run_section(run: RunData) -> list[Block]:
    blocks: list[Block] = [Heading("Run")]
    # config.json holds "options" (what changes results) and "run" (every option): show one
    options = run.config.get("run") or {k: v for k, v in run.config.items() if k != "versions"}
    if options:
        blocks += [Heading("Configuration", 3), _key_value_table(options)]
    if run.config.get("versions"):
        blocks += [Heading("Library versions", 3), _key_value_table(run.config["versions"])]
    sizes = dict(run.metrics.get("sizes") or {})
    if run.prompts.get("filter") and "filter" not in sizes:  # runs before the train filter moved
        sizes["validation filter"] = run.prompts["filter"]
    if sizes:
        blocks += [Heading("Sizes", 3), _key_value_table(sizes)]
    timings = run.metrics.get("timings") or {}
    if timings:
        rows = [[step, _seconds(value)] for step, value in timings.items()]
        total = sum(v for v in timings.values() if isinstance(v, int | float))
        rows.append(["total", _seconds(total)])
        blocks += [Heading("Wall time per step", 3), Table(["step", "wall time"], rows)]
    if len(blocks) == 1:
        blocks.append(Para("config.json and metrics.json record no configuration.", "note"))
    return blocks


# --------------------------------------------------------------------------- markdown input


_FENCE = re.compile(r"^\s*```")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_INLINE = re.compile(
    r"`([^`]+)`|!\[([^\]]*)\]\(([^)\s]+)\)|\[([^\]]+)\]\(([^)\s]+)\)|\*\*(.+?)\*\*|\*([^*\s][^*]*)\*"
)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _data_uri(path: str, base_dir: Path) -> str | None:
    """``path`` (relative to ``base_dir``, inside it) as a data URI, or None."""
    if "://" in path or path.startswith(("/", "\\")):
        return None
    root = base_dir.resolve()
    target = (root / path).resolve()
    mime = IMAGE_TYPES.get(target.suffix.lower())
    if mime is None or not target.is_file() or not target.is_relative_to(root):
        return None
    return f"data:{mime};base64," + base64.b64encode(target.read_bytes()).decode("ascii")


def _image_html(alt: str, path: str, base_dir: Path) -> str:
    uri = _data_uri(path, base_dir)
    if uri is None:
        return f'<span class="missing">[image not found in the run directory: {_esc(path)}]</span>'
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _inline(text: str, base_dir: Path) -> str:
    """Escape ``text`` and render code spans, images, http(s) links, bold and italics."""
    out, pos = [], 0
    for match in _INLINE.finditer(text):
        out.append(_esc(text[pos : match.start()]))
        code, alt, src, label, href, strong, em = match.groups()
        if code is not None:
            out.append(f"<code>{_esc(code)}</code>")
        elif src is not None:
            out.append(_image_html(alt or "", src, base_dir))
        elif href is not None:
            inner = _inline(label, base_dir)
            ok = href.startswith(("http://", "https://"))
            out.append(f'<a href="{_esc(href)}">{inner}</a>' if ok else inner)
        elif strong is not None:
            out.append(f"<strong>{_inline(strong, base_dir)}</strong>")
        else:
            out.append(f"<em>{_inline(em, base_dir)}</em>")
        pos = match.end()
    out.append(_esc(text[pos:]))
    return "".join(out)


def _table_cells(line: str) -> list[str]:
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)]


def _md_table(lines: list[str], base_dir: Path) -> str:
    header, rows = _table_cells(lines[0]), [_table_cells(line) for line in lines[2:]]
    head = "".join(f"<th>{_inline(c, base_dir)}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_inline(c, base_dir)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _take(lines: list[str], start: int, test: Any) -> int:
    end = start
    while end < len(lines) and test(lines[end]):
        end += 1
    return end


def _md_block(lines: list[str], i: int, base_dir: Path, shift: int) -> tuple[str, int]:
    """Render the block starting at line ``i``; return its HTML and the next line index."""
    line = lines[i]
    if _FENCE.match(line):
        end = _take(lines, i + 1, lambda s: not _FENCE.match(s))
        code = "\n".join(lines[i + 1 : end])
        return f"<pre><code>{_esc(code)}</code></pre>", end + 1
    heading = _HEADING.match(line)
    if heading:
        level = min(6, len(heading.group(1)) + shift)
        return f"<h{level}>{_inline(heading.group(2), base_dir)}</h{level}>", i + 1
    if "|" in line and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
        end = _take(lines, i + 2, lambda s: "|" in s and s.strip() != "")
        return _md_table(lines[i:end], base_dir), end
    for pattern, tag in ((_BULLET, "ul"), (_NUMBERED, "ol")):
        if pattern.match(line):
            end = _take(lines, i, lambda s, p=pattern: p.match(s) is not None)
            items = "".join(
                f"<li>{_inline(p.group(1), base_dir)}</li>"
                for p in (pattern.match(s) for s in lines[i:end])
                if p is not None
            )
            return f"<{tag}>{items}</{tag}>", end
    end = _take(lines, i, lambda s: s.strip() != "" and not _starts_block(s))
    end = max(end, i + 1)
    text = " ".join(s.strip() for s in lines[i:end])
    return f"<p>{_inline(text, base_dir)}</p>", end


def _starts_block(line: str) -> bool:
    return any(p.match(line) for p in (_FENCE, _HEADING, _BULLET, _NUMBERED))


def render_markdown(text: str, base_dir: str | Path, shift_headings: int = 0) -> str:
    """Simple markdown to safe HTML: every character of the input is escaped; headings,
    paragraphs, lists, pipe tables, code fences, code spans, bold, italics and http(s) links
    are rendered; images inside ``base_dir`` are embedded as base64, others are not loaded."""
    lines, i, out = text.splitlines(), 0, []
    base = Path(base_dir)
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        chunk, i = _md_block(lines, i, base, shift_headings)
        out.append(chunk)
    return "\n".join(out)


def _shift_md_headings(text: str, shift: int) -> str:
    out, fenced = [], False
    for line in text.splitlines():
        fenced = fenced != bool(_FENCE.match(line))
        if not fenced and _HEADING.match(line):
            line = "#" * shift + line
        out.append(line)
    return "\n".join(out)


def _suffix_blocks(text: str, run_dir: Path) -> list[Block]:
    """The extra section: its leading ``#`` heading (or "Additional analysis") becomes a
    section of the report; the rest is rendered one heading level down."""
    lines = text.strip().splitlines()
    first = _HEADING.match(lines[0]) if lines else None
    if first and len(first.group(1)) == 1:
        title, body = first.group(2), "\n".join(lines[1:]).strip()
    else:
        title, body = "Additional analysis", "\n".join(lines)
    rendered = render_markdown(body, run_dir, shift_headings=1)
    return [
        Heading(title),
        Raw(f'<div class="extra">\n{rendered}\n</div>', _shift_md_headings(body, 1)),
    ]


# --------------------------------------------------------------------------- HTML output


CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       background: #fff; margin: 0; }
main { max-width: 960px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #ddd; }
h3 { font-size: 16px; margin: 22px 0 8px; }
h4 { font-size: 14px; margin: 14px 0 6px; color: #444; }
nav { font-size: 13px; color: #555; margin-bottom: 8px; }
nav a { color: #2166ac; margin-right: 14px; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 13.5px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
table.kv td:first-child { color: #555; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0 20px; }
figure img, .extra img { max-width: 100%; height: auto; }
figcaption, .caption { font-size: 13px; color: #555; margin-top: 4px; }
.note { color: #555; font-size: 13.5px; }
.warn { background: #fff4e0; border-left: 4px solid #e08a00; padding: 8px 12px; }
.samples h4 { margin-bottom: 4px; }
.sample { border: 1px solid #e4e4e4; border-radius: 4px; margin: 6px 0; padding: 6px 10px; }
.prompt { font-size: 13px; color: #444; }
.completion { white-space: pre-wrap; font: 12.5px/1.45 ui-monospace, Menlo, Consolas, monospace;
              margin: 4px 0 0; background: #fafafa; padding: 4px 6px; }
.flag { display: inline-block; font-size: 11px; font-weight: 600; padding: 0 6px;
        border-radius: 8px; margin-right: 6px; }
.flag.refused { background: #fde0dd; color: #a50f15; }
.flag.complied { background: #deebf7; color: #08519c; }
.flag.unknown { background: #eee; color: #555; }
.missing { color: #a50f15; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


_NUMBER = re.compile(r"[-−+]?[\d.]+(e[-+]?\d+)?( s| min \d+ s| \([-+][\d.]+\))?")


def _table_html(table: Table) -> str:
    """A table; one with an empty header is a key/value list (no header, text aligned)."""
    kv = all(not h for h in table.header)
    head = "".join(f"<th>{_esc(h)}</th>" for h in table.header)
    head = "" if kv else f"<thead><tr>{head}</tr></thead>"
    body = "".join(
        "<tr>" + "".join(_cell_html(c, j, not kv) for j, c in enumerate(row)) + "</tr>"
        for row in table.rows
    )
    caption = f'<div class="caption">{_esc(table.caption)}</div>' if table.caption else ""
    return f'<table class="{"kv" if kv else "data"}">{head}<tbody>{body}</tbody></table>{caption}'


def _cell_html(cell: str, column: int, align_numbers: bool) -> str:
    numeric = align_numbers and column > 0 and _NUMBER.fullmatch(cell)
    return f'<td class="num">{_esc(cell)}</td>' if numeric else f"<td>{_esc(cell)}</td>"


def _flag(refusal: bool | None) -> tuple[str, str]:
    if refusal is None:
        return "unknown", "no flag"
    return ("refused", "refused") if refusal else ("complied", "complied")


def _samples_html(samples: Samples) -> str:
    parts = [f'<div class="samples"><h4>{_esc(samples.title)}</h4>']
    for s in samples.items:
        css, label = _flag(s.refusal)
        parts.append(
            f'<div class="sample"><div class="prompt"><span class="flag {css}">{label}</span>'
            f'{_esc(s.prompt)}</div><pre class="completion">{_esc(s.completion)}</pre></div>'
        )
    if not samples.items:
        parts.append('<p class="note">no completions in this file</p>')
    return "".join(parts) + "</div>"


def _block_html(block: Block) -> str:
    if isinstance(block, Heading):
        anchor = f' id="{_slug(block.text)}"' if block.level == 2 else ""
        return f"<h{block.level}{anchor}>{_esc(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        css = f' class="{block.kind}"' if block.kind else ""
        return f"<p{css}>{_esc(block.text)}</p>"
    if isinstance(block, Table):
        return _table_html(block)
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(block.alt)}">'
            f"<figcaption>{_esc(block.caption)}</figcaption></figure>"
        )
    if isinstance(block, Samples):
        return _samples_html(block)
    return block.html


def _html_document(title: str, blocks: Sequence[Block]) -> str:
    toc = " ".join(
        f'<a href="#{_slug(b.text)}">{_esc(b.text)}</a>'
        for b in blocks
        if isinstance(b, Heading) and b.level == 2
    )
    body = "\n".join(_block_html(b) for b in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{_esc(title)}</h1>\n<nav>{toc}</nav>\n{body}\n</main>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------- markdown output


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~])")


def _md_esc(text: str) -> str:
    """Plain text safe inside markdown (and inline HTML): escape markup characters."""
    return _MD_SPECIAL.sub(r"\\\1", text.replace("&", "&amp;")).replace("\n", " ")


def _table_md(table: Table) -> str:
    header = [_md_esc(h) for h in table.header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_esc(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", f"*{_md_esc(table.caption)}*"]
    return "\n".join(lines)


def _samples_md(samples: Samples) -> str:
    parts = [f"#### {_md_esc(samples.title)}"]
    for s in samples.items:
        _, label = _flag(s.refusal)
        quoted = "\n".join("> " + _md_esc(line) for line in (s.completion or " ").splitlines())
        parts.append(f"- **{label}**: {_md_esc(s.prompt)}\n\n{quoted}")
    return "\n\n".join(parts)


def _block_md(block: Block) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + _md_esc(block.text)
    if isinstance(block, Para):
        prefix = {"warn": "> **Warning.** ", "note": "> "}.get(block.kind, "")
        return prefix + _md_esc(block.text)
    if isinstance(block, Table):
        return _table_md(block)
    if isinstance(block, Image):
        return f"![{_md_esc(block.alt)}](figures/{block.name})\n\n*{_md_esc(block.caption)}*"
    if isinstance(block, Samples):
        return _samples_md(block)
    return block.md


def _md_document(title: str, blocks: Sequence[Block]) -> str:
    return "\n\n".join([f"# {_md_esc(title)}", *(_block_md(b) for b in blocks)]) + "\n"


# --------------------------------------------------------------------------- entry point


def build_blocks(run: RunData, truncate: int, suffix_section: str | None = None) -> list[Block]:
    """Every section of the report, in order."""
    blocks = [
        *_summary(run),
        *_direction_section(run),
        *_selection_section(run),
        *_refusal_section(run),
        *_loss_section(run),
        *_cosine_section(run),
        *_completions_section(run, truncate),
        *_run_section(run),
    ]
    if suffix_section and suffix_section.strip():
        blocks += _suffix_blocks(suffix_section, run.run_dir)
    return blocks


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_figures(run_dir: Path, blocks: Iterable[Block]) -> None:
    for block in blocks:
        if isinstance(block, Image):
            with atomic_path(run_dir / "figures" / block.name) as tmp:
                tmp.write_bytes(block.png)


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
    _write_figures(run.run_dir, blocks)
    html_path, md_path = run.run_dir / "report.html", run.run_dir / "report.md"
    _write_text(md_path, _md_document(title, blocks))
    _write_text(html_path, _html_document(title, blocks))
    return html_path, md_path
