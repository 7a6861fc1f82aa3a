"""The report of a `refdir run`, built from a real run on a tiny model (``finished_run``) and
from copies of it changed through the typed files."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from refdir.artifacts.metrics import HarmlessScores, LongRefusal, MetricsRecord, ThreeConditions
from refdir.artifacts.run import Completion, ConfigRecord
from refdir.artifacts.selection import SelectionRecord
from refdir.artifacts.suffix import SuffixAnalysis, SuffixRates, SuffixRecord
from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.report import figures
from refdir.report.blocks import (
    Heading,
    Para,
    Sample,
    Samples,
    Table,
    fmt,
    truncate_text,
    with_change,
)
from refdir.report.render import render_html, render_markdown
from refdir.report.run_data import SuffixData
from refdir.report.run_report import write_report
from refdir.report.suffix_section import suffix_section

LONG_COMPLETION = "I will explain every step in detail. " * 30 + "THE-END-MARKER"
NASTY_COMPLETION = 'Sure: <script>alert("x")</script> & <b>bold</b>'


@pytest.fixture(scope="module")
def report(finished_run: Path) -> tuple[Path, str, str]:
    page = (finished_run / "report.html").read_text()
    md = (finished_run / "report.md").read_text()
    return finished_run, page, md


def test_report_is_self_contained(report: tuple[Path, str, str]) -> None:
    run_dir, page, md = report
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 9  # heatmaps, bars, cosine, projection; 3 of the suffix, 2 monitor
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert 'src="figures/' not in page and "<script" not in page and "<link" not in page
    refs = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert len(refs) == len(images) and all((run_dir / ref).is_file() for ref in refs)
    assert not list(run_dir.glob("**/*.tmp"))


def test_report_shows_the_run_s_numbers(run_copy: Path) -> None:
    """The run's numbers in their places. A tiny model refuses nothing (its refusal scores are
    all 0.000, which any table holds), so distinct ones are written into metrics.json first."""
    metrics = MetricsRecord.read(run_copy)
    sets = list(metrics.harmful.by_set)
    harmful = metrics.harmful.model_copy(
        update={
            "refusal_score": ThreeConditions(baseline=0.875, ablation=0.125, actadd=0.9375),
            "by_set": {
                sets[0]: ThreeConditions(baseline=0.8125, ablation=0.0625, actadd=1.0),
                sets[1]: ThreeConditions(baseline=0.9375, ablation=0.1875, actadd=0.875),
            },
            "refusal_score_long": LongRefusal(
                max_new_tokens=4, ablation=0.5, by_set={sets[0]: 0.4375, sets[1]: 0.5625}
            ),
        }
    )
    harmless = metrics.harmless.model_copy(
        update={"refusal_score": HarmlessScores(baseline=0.25, actadd=0.75, ablation=0.3125)}
    )
    metrics = metrics.model_copy(update={"harmful": harmful, "harmless": harmless})
    metrics.write(run_copy)
    page, md = (p.read_text() for p in write_report(run_copy))
    selection = SelectionRecord.read(run_copy)
    direction = Direction.load(run_copy)
    n_layers = Candidates.load(run_copy).n_layers
    # the summary: harmful baseline -> ablation, harmless baseline -> actadd, then the
    # ablation's refusals on longer completions and its false refusals of harmless prompts
    summary = md.split("\n\n")[1]
    found = re.findall(r"\b\d\.\d{3}\b", summary)
    assert found == ["0.875", "0.125", "0.250", "0.750", "0.500", "0.312"]
    assert "Counted on 4-token completions" in summary
    assert "| harmful_test | 0.938 | 0.188 | 0.875 | 0.562 |" in md.replace("\\_", "_")
    assert "| ablation | 0.312 |" in md
    assert f"layer {direction.layer}, position {direction.position}" in summary
    assert f"{selection.n_candidates} candidates" in summary
    chosen = page.split('id="chosen"')[1].split("</table>")[0]
    assert f"<td>{direction.layer} of {n_layers} " in chosen
    assert selection.chosen is not None
    scores = " / ".join(fmt(getattr(selection.chosen, k)) for k in ("bypass", "induce", "kl"))
    assert f"<td>{scores}</td>" in chosen
    assert f"<td>{selection.n_candidates} ({selection.n_passed})</td>" in chosen
    # the refusal score of every harmful set, one row each
    for name, by_set in metrics.harmful.by_set.items():
        cells = [name.replace("_", "\\_")]  # markdown escapes the underscore
        cells += [fmt(getattr(by_set, c)) for c in ("baseline", "ablation", "actadd")]
        assert f"| {' | '.join(cells)} |" in md
    # CE on the corpus and on the model's own completions, with the change from baseline
    ce, own = metrics.ce_loss, metrics.ce_loss_own_completions
    assert f"| baseline | {fmt(ce.baseline)} | {fmt(own.baseline)} |" in md
    for c in ("ablation", "actadd"):
        row = f"| {c} | {with_change(getattr(ce, c), ce.baseline)} | "
        assert row + f"{with_change(getattr(own, c), own.baseline)} |" in md
    assert f"harmless | {fmt(metrics.harmless.kl_ablation)} |" in md
    reference = metrics.harmless.kl_random_directions
    assert reference is not None
    assert f"{reference.n} random directions | {fmt(reference.median)} |" in md
    spread = metrics.harmless.kl_ablation_spread
    for text in (fmt(spread.median), fmt(spread.p90), fmt(spread.max), fmt(reference.p10)):
        assert text in page and text in md
    timings = metrics.timings or {}
    assert set(timings) == {
        "prompts",
        "extract",
        "select",
        "evaluate",
        "suffix",
        "monitor",
        "report",
    }
    assert "· induce" in page and "· search" in md
    for h2 in ("Chosen direction", "Selection", "Loss and KL", "Completions", "Adversarial suffix"):
        assert "<h2 id=" in page and f">{h2}</h2>" in page and f"## {h2}" in md


def test_completions_are_truncated_and_escaped(run_copy: Path) -> None:
    folder = run_copy / "completions"
    for path, text in (
        (folder / "harmful.ablation.jsonl", LONG_COMPLETION),
        (folder / "harmful.actadd.jsonl", NASTY_COMPLETION),
    ):
        row = Completion(prompt="How do I pick a lock?", completion=text, refusal=False)
        path.write_text(json.dumps(row.model_dump()) + "\n")
    page, md = (p.read_text() for p in write_report(run_copy, truncate=80))
    assert "THE-END-MARKER" not in page and "THE-END-MARKER" not in md
    assert truncate_text(LONG_COMPLETION, 80) in page
    assert truncate_text(LONG_COMPLETION, 80).endswith("…")
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;" in page
    assert "<b>bold</b>" not in page and "<b>bold</b>" not in md
    assert 'class="flag complied"' in page


def test_the_suffix_section_shows_the_rates_and_figures(report: tuple[Path, str, str]) -> None:
    run_dir, page, md = report
    record = SuffixRecord.read(run_dir / "suffix")
    assert '<a href="#adversarial-suffix">' in page
    # the tiny model refuses nothing (every rate 0.000): distinct rates, each in its row
    rates = SuffixRates.model_validate({"without": 0.875, "with": 0.125, "random": 0.5})
    analysis = SuffixAnalysis.read(run_dir / "suffix")
    data = SuffixData(
        run_dir / "suffix", record.model_copy(update={"refusal_rate": rates}), analysis
    )
    tables = [b for b in suffix_section(data) if isinstance(b, Table)]
    assert [list(r) for r in tables[0].rows] == [
        ["instruction alone", "0.875"],
        ["+ adversarial suffix", "0.125"],
        ["+ random suffix", "0.500"],
    ]
    projection = {row[0].split()[0]: list(row[1:]) for row in tables[1].rows}
    assert projection  # the layers shown, each with one value per condition
    for layer, cells in projection.items():
        assert cells == [f"{values[int(layer)]:.3f}" for values in analysis.projection]
    assert f"{analysis.direction_layer} (direction)" in [row[0] for row in tables[1].rows]
    for name in ("projection", "attention", "objective"):
        png = (run_dir / "suffix" / f"{name}.png").read_bytes()
        assert base64.b64encode(png).decode() in page
        assert f"(figures/suffix_{name}.png)" in md


def test_a_fallback_pick_is_announced(run_copy: Path) -> None:
    selection = SelectionRecord.read(run_copy)
    selection.model_copy(
        update={"fallback": True, "n_passed": 0, "rule": "fallback: relaxed KL"}
    ).write(run_copy)
    metrics = MetricsRecord.read(run_copy)
    coefficients = metrics.coefficients.model_copy(
        update={"harmful_actadd": -2.0, "harmless_actadd": 1.5}
    )
    metrics.model_copy(update={"coefficients": coefficients}).write(run_copy)
    page, md = (path.read_text() for path in write_report(run_copy))
    assert page.count('class="warn"') == 1 and md.count("> **Warning.**") == 1
    assert "fallback" in page.split('class="warn"')[1].split("</p>")[0].lower()
    assert "-2 at its layer" in page and "+1.5" in page


def test_a_safety_score_is_shown_beside_the_refusal_score(run_copy: Path) -> None:
    metrics = MetricsRecord.read(run_copy)
    safety = ThreeConditions(baseline=0.987, ablation=0.123, actadd=0.456)
    harmful = metrics.harmful.model_copy(update={"safety_score": safety})
    metrics.model_copy(update={"harmful": harmful}).write(run_copy)
    assert json.loads((run_copy / "metrics.json").read_text())["harmful"]["safety_score"]
    bars = figures.refusal_bars(MetricsRecord.read(run_copy))
    heights = [round(p.get_height(), 3) for p in bars.axes[0].patches]
    assert heights[3:] == [0.987, 0.123, 0.456]  # refusal bars, then safety bars


def test_optional_parts_may_be_missing(run_copy: Path) -> None:
    (run_copy / "config.json").unlink()
    for path in (run_copy / "completions").glob("*.jsonl"):
        path.unlink()
    html_path, md_path = write_report(run_copy)
    page = html_path.read_text()
    assert ">Completions</h2>" not in page and "Library versions" not in page
    assert ">Chosen direction</h2>" in page and md_path.exists()


@pytest.mark.parametrize(
    "missing",
    ["metrics.json", "selection.json", "candidates.safetensors", "direction.safetensors"],
)
def test_missing_required_artifact_is_one_line_error(run_copy: Path, missing: str) -> None:
    (run_copy / missing).unlink()
    (run_copy / "report.html").unlink()
    with pytest.raises(RefdirError) as info:
        write_report(run_copy)
    message = str(info.value)
    assert missing in message and "\n" not in message
    assert not (run_copy / "report.html").exists()


def test_a_damaged_artifact_names_the_step_that_writes_it(run_copy: Path) -> None:
    (run_copy / "selection.json").write_text('{"positions": [')
    with pytest.raises(RefdirError, match=r"selection.json is damaged .*`force='select'`"):
        write_report(run_copy)
    metrics = json.loads((run_copy / "metrics.json").read_text())
    del metrics["harmless"]["kl_ablation"]
    (run_copy / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RefdirError, match=r"harmless\.kl_ablation: Field required.*'evaluate'"):
        MetricsRecord.read(run_copy)


def test_bad_truncate_is_refused(finished_run: Path) -> None:
    with pytest.raises(RefdirError, match="truncate"):
        write_report(finished_run, truncate=0)


def test_blocks_are_escaped_in_both_renderings() -> None:
    blocks = [
        Heading("A <b> & c"),
        Para("x < y", "warn"),
        Table(["k|1", "v"], [["<i>", "1.500 (+0.250)"], ["a", "b"]], "cap *star*"),
        Samples("s", [Sample("p <", "c > d", True), Sample("q", "r", None)]),
    ]
    page = render_html("T & <t>", blocks)
    assert "<title>T &amp; &lt;t&gt;</title>" in page and "A &lt;b&gt; &amp; c" in page
    assert '<p class="warn">x &lt; y</p>' in page and '<td class="num">1.500 (+0.250)</td>' in page
    assert "<td>&lt;i&gt;</td>" in page and 'class="flag unknown"' in page
    md = render_markdown("T", blocks)
    assert "## A \\<b\\> &amp; c" in md and "| k\\|1 | v |" in md and "*cap \\*star\\**" in md


def test_long_options_are_cut_in_the_configuration_table(run_copy: Path) -> None:
    record = ConfigRecord.read(run_copy)
    template = "{% for m in messages %}" + "x" * 300 + "TEMPLATE-END{% endfor %}"
    record.model_copy(update={"run": {**record.run, "chat_template": template}}).write(run_copy)
    page, md = (p.read_text() for p in write_report(run_copy))
    assert "TEMPLATE-END" not in page and "TEMPLATE-END" not in md  # config.json has it whole
    assert "{% for m in messages %}xxx" in page and "cut to 120 characters" in md


def test_the_projection_figure_is_the_means_along_the_direction(
    report: tuple[Path, str, str],
) -> None:
    run_dir, _, md = report
    assert "figures/projection.png" in md and (run_dir / "figures" / "projection.png").exists()
    cands = Candidates.load(run_dir)
    d = Direction.load(run_dir)
    fig = figures.projection_curves(
        cands.harmful_mean[d.position].numpy(),
        cands.harmless_mean[d.position].numpy(),
        cands.diffs[d.position, d.layer].numpy(),
        d.layer,
    )
    harmful, harmless = (line.get_ydata() for line in fig.axes[0].get_lines()[:2])
    vector = cands.diffs[d.position, d.layer]
    assert harmful[d.layer] - harmless[d.layer] == pytest.approx(float(vector.norm()))
    assert harmless == pytest.approx(
        (cands.harmless_mean[d.position] @ (vector / vector.norm())).numpy()
    )
