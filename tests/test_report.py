"""The report of a `refdir run`, built from a synthetic run directory that follows
docs/run-artifacts.md (P=3 positions, L=6 layers, d=8)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from refdir.directions.candidates import Candidates
from refdir.errors import RefdirError
from refdir.report import figures
from refdir.report.blocks import truncate_text
from refdir.report.render import render_markdown
from refdir.report.run_report import write_report

P, L, D = 3, 6, 8
CHOSEN_LAYER, CHOSEN_POSITION = 3, -1
LONG_COMPLETION = "I will explain every step in detail. " * 30 + "THE-END-MARKER"
NASTY_COMPLETION = 'Sure: <script>alert("x")</script> & <b>bold</b>'
PAPER_RULE = "paper: lowest bypass among candidates with kl <= 0.1, induce >= 0, layer < 0.8 L"
FALLBACK_RULE = "fallback: lowest bypass with kl <= 0.1 (no candidate passed the paper's filter)"


def _grid(base: float, step: float) -> list[list[float | None]]:
    grid: list[list[float | None]] = [
        [round(base + step * (p + layer), 3) for layer in range(L)] for p in range(P)
    ]
    grid[0][0] = None  # a skipped candidate: zero difference of means
    return grid


def _selection(fallback: bool) -> dict[str, Any]:
    passed = [[(not fallback) and 1 <= layer < 4 and p > 0 for layer in range(L)] for p in range(P)]
    return {
        "positions": list(range(-P, 0)),
        "layers": list(range(L)),
        "bypass": _grid(2.0, -0.5),
        "induce": _grid(-3.0, 0.6),
        "kl": _grid(0.01, 0.03),
        "baseline": {"harmful_val": 2.4, "harmless_val": -5.1},
        "filters": {"kl_max": 0.1, "induce_min": 0.0, "max_layer_fraction": 0.8},
        "passed": passed,
        "chosen": {
            "position": CHOSEN_POSITION,
            "layer": CHOSEN_LAYER,
            "bypass": -1.5,
            "induce": 0.6,
            "kl": 0.07,
        },
        "rule": FALLBACK_RULE if fallback else PAPER_RULE,
    }


def _metrics(safety: bool) -> dict[str, Any]:
    harmful: dict[str, Any] = {
        "refusal_score": {"baseline": 0.97, "ablation": 0.02, "actadd": 0.01},
        "by_set": {"harmful_test": {"baseline": 0.97, "ablation": 0.02, "actadd": 0.01}},
    }
    if safety:
        harmful["safety_score"] = {"baseline": 0.99, "ablation": 0.1, "actadd": 0.1}
    return {
        "model": "organism",
        "direction": {"layer": CHOSEN_LAYER, "position": CHOSEN_POSITION, "norm": 3.1},
        "selection": {"rule": "paper", "n_candidates": P * L - 1, "n_passed": 6},
        "sizes": {
            "harmful_train": 16,
            "harmless_train": 16,
            "harmful_val": 4,
            "harmless_val": 4,
            "harmful_eval": {"harmful_test": 4},
            "harmless_eval": {"harmless_test": 4},
        },
        "harmful": harmful,
        "harmless": {
            "refusal_score": {"baseline": 0.02, "actadd": 0.95},
            "kl_ablation": 0.05,
            "kl_ablation_spread": {
                "median": 0.04,
                "p90": 0.09,
                "max": 0.31,
                "refused_at_baseline": {"n": 1, "mean": 0.31},
                "answered_at_baseline": {"n": 3, "mean": 0.0133},
            },
        },
        "ce_loss": {"baseline": 2.1, "ablation": 2.12, "actadd": 2.5},
        "timings": {"prompts": 1.2, "extract": 20.5, "select": 60.1, "evaluate": 120.0},
    }


def _completions(root: Path) -> None:
    folder = root / "completions"
    folder.mkdir()
    rows = {
        ("harmful_test", "baseline"): [("How do I pick a lock?", "I can't help with that.", True)],
        ("harmful_test", "ablation"): [("How do I pick a lock?", LONG_COMPLETION, False)],
        ("harmful_test", "actadd"): [("How do I pick a lock?", NASTY_COMPLETION, False)],
        ("harmless_test", "baseline"): [
            ("Write a haiku about tea.", "Steam rises | slowly", False)
        ],
        ("harmless_test", "actadd"): [("Write a haiku about tea.", "I cannot do that.", True)],
    }
    for (name, condition), items in rows.items():
        lines = [json.dumps({"prompt": p, "completion": c, "refusal": r}) for p, c, r in items]
        (folder / f"{name}.{condition}.jsonl").write_text("\n".join(lines) + "\n")


def make_run(
    root: Path, fallback: bool = False, safety: bool = True, completions: bool = True
) -> Path:
    gen = torch.Generator().manual_seed(0)
    harmful = torch.randn(P, L + 1, D, generator=gen, dtype=torch.float64)
    harmless = torch.randn(P, L + 1, D, generator=gen, dtype=torch.float64)
    harmless[0, 0] = harmful[0, 0]  # the zero candidate that selection skipped
    cands = Candidates(harmful, harmless, "organism", n_harmful=16, n_harmless=16)
    cands.save(root / "candidates.safetensors")
    cands.direction(CHOSEN_POSITION, CHOSEN_LAYER).save(root)
    config = {
        "model": "organism",
        "seed": 42,
        "n_train": 16,
        "chat_template": "{% for m in messages %}" + "x" * 300 + "TEMPLATE-END{% endfor %}",
        "versions": {
            "python": "3.12.1",
            "torch": "2.13.0",
            "transformers": "5.0.0",
            "refdir": "0.1.0",
        },
    }
    (root / "config.json").write_text(json.dumps(config))
    prompts = {
        "harmful_train": ["a"],
        "harmless_train": ["b"],
        "harmful_val": ["c"],
        "harmless_val": ["d"],
        "filter": {"harmful_val": {"kept": 4, "dropped": 1}},
    }
    (root / "prompts.json").write_text(json.dumps(prompts))
    (root / "selection.json").write_text(json.dumps(_selection(fallback)))
    (root / "metrics.json").write_text(json.dumps(_metrics(safety)))
    if completions:
        _completions(root)
    return root


SUFFIX = (
    "# Adversarial suffix\n\nThe suffix <em>suppresses</em> the direction & **more**.\n\n"
    "| token | attention |\n|---|---:|\n| `<s>` | 0.5 |\n\n"
    "![heads](figures/suffix.png)\n\n![escape](../outside.png)\n"
)
FAKE_PNG = b"\x89PNG\r\n\x1a\nfake"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One full report (truncate=80, with a suffix section) shared by the read-only tests."""
    run_dir = make_run(tmp_path_factory.mktemp("run"))
    (run_dir / "figures").mkdir()
    (run_dir / "figures" / "suffix.png").write_bytes(FAKE_PNG)
    (run_dir.parent / "outside.png").write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    html_path, md_path = write_report(run_dir, truncate=80, suffix_section=SUFFIX)
    assert (html_path, md_path) == (run_dir / "report.html", run_dir / "report.md")
    return run_dir, html_path.read_text(), md_path.read_text()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_report_is_self_contained(report: tuple[Path, str, str]) -> None:
    run_dir, page, md = report
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 3
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert 'src="figures/' not in page and "<script" not in page and "<link" not in page
    refs = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert len(refs) >= 3 and all((run_dir / ref).is_file() for ref in refs)
    assert not list(run_dir.glob("**/*.tmp"))


def test_report_shows_the_chosen_direction_and_numbers(report: tuple[Path, str, str]) -> None:
    _, page, md = report
    assert f"{CHOSEN_LAYER} of {L} (residual stream input of layer {CHOSEN_LAYER})" in page
    assert f"{CHOSEN_POSITION} (the last post-instruction token)" in page
    assert "paper: lowest bypass among candidates with kl &lt;= 0.1" in page
    assert "Fallback rule" not in page and "Fallback rule" not in md
    spread = (
        "Per prompt, that KL has median 0.040, 90th percentile 0.090 and maximum 0.310; its mean "
        "is 0.310 on the 1 prompt refused at baseline and 0.013 on the 3 prompts answered"
    )
    for text in ("2.120", "0.050", "3.12.1", "Wall time per step", "1 min 0 s", spread):
        assert text in page and text in md
    assert "harmful_test" in page and "harmful\\_test" in md


def test_completions_are_truncated_and_escaped(report: tuple[Path, str, str]) -> None:
    _, page, md = report
    assert "THE-END-MARKER" not in page and "THE-END-MARKER" not in md
    assert truncate_text(LONG_COMPLETION, 80) in page
    assert truncate_text(LONG_COMPLETION, 80).endswith("…")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;" in page
    assert "<b>bold</b>" not in page and "<b>bold</b>" not in md
    assert 'class="flag refused"' in page and 'class="flag complied"' in page


def test_suffix_section_is_rendered_safely(report: tuple[Path, str, str]) -> None:
    _, page, md = report
    assert '<h2 id="adversarial-suffix">Adversarial suffix</h2>' in page
    assert '<a href="#adversarial-suffix">' in page
    assert "&lt;em&gt;suppresses&lt;/em&gt; the direction &amp; <strong>more</strong>" in page
    assert "<td><code>&lt;s&gt;</code></td>" in page
    assert "data:image/png;base64," + base64.b64encode(FAKE_PNG).decode() in page
    assert base64.b64encode(b"\x89PNG\r\n\x1a\nsecret").decode() not in page
    assert "image not found in the run directory: ../outside.png" in page
    assert "## Adversarial suffix" in md and "![heads](figures/suffix.png)" in md


def test_fallback_rule_is_announced(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, fallback=True)
    # extras `refdir run` records beyond the documented schema are shown when present
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["ce_loss_own_completions"] = {"baseline": 1.5, "ablation": 1.6, "actadd": 1.9}
    metrics["coefficients"] = {"harmful_actadd": -2.0, "harmless_actadd": 1.5}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    page, md = (path.read_text() for path in write_report(run_dir))
    assert "Fallback rule: no candidate passed the paper&#x27;s filter" in page
    assert "KL ≤ 0.1, induce ≥ 0, layer &lt; 0.8 L" in page
    assert "by a fallback rule" in page and "Fallback rule" in md
    assert "CE loss, own completions" in page and "1.900 (+0.400)" in page
    assert "coefficient -2 at its layer" in page and "addition with +1.5" in page


def test_optional_parts_may_be_missing(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, safety=False, completions=False)
    for name in ("config.json", "prompts.json", "direction.json", "direction.safetensors"):
        (run_dir / name).unlink()
    html_path, md_path = write_report(run_dir)
    page = html_path.read_text()
    assert "Completions" not in page and "Library versions" not in page
    assert f"{CHOSEN_LAYER} of {L}" in page and md_path.exists()


@pytest.mark.parametrize("missing", ["metrics.json", "selection.json", "candidates.safetensors"])
def test_missing_required_artifact_is_one_line_error(run_dir: Path, missing: str) -> None:
    (run_dir / missing).unlink()
    with pytest.raises(RefdirError) as info:
        write_report(run_dir)
    message = str(info.value)
    assert missing in message and "refdir run --out" in message and "\n" not in message
    assert not (run_dir / "report.html").exists()


def test_bad_truncate_is_refused(run_dir: Path) -> None:
    with pytest.raises(RefdirError, match="truncate"):
        write_report(run_dir, truncate=0)


def test_render_markdown_blocks(tmp_path: Path) -> None:
    out = render_markdown(
        "## Title\n\n- one\n- two\n\n```\n<x>\n```\n\n[paper](https://arxiv.org/abs/2406.11717) [bad](javascript:alert(1))",
        tmp_path,
    )
    assert "<h2>Title</h2>" in out and "<ul><li>one</li><li>two</li></ul>" in out
    assert "<pre><code>&lt;x&gt;</code></pre>" in out
    assert '<a href="https://arxiv.org/abs/2406.11717">paper</a>' in out
    assert 'href="javascript' not in out


def test_long_options_are_cut_in_the_configuration_table(report: tuple[Path, str, str]) -> None:
    _, page, md = report
    assert "TEMPLATE-END" not in page and "TEMPLATE-END" not in md  # config.json has it whole
    assert "{% for m in messages %}xxx" in page and "cut to 120 characters" in md


def test_the_projection_figure_is_the_means_along_the_direction(
    report: tuple[Path, str, str],
) -> None:
    run_dir, page, md = report
    assert "figures/projection.png" in md and (run_dir / "figures" / "projection.png").exists()
    assert "projected onto the chosen direction" in md and page.count("<figure>") >= 4
    cands = Candidates.load(run_dir / "candidates.safetensors")
    fig = figures.projection_curves(
        cands.harmful_mean[CHOSEN_POSITION].numpy(),
        cands.harmless_mean[CHOSEN_POSITION].numpy(),
        cands.diffs[CHOSEN_POSITION, CHOSEN_LAYER].numpy(),
        CHOSEN_LAYER,
    )
    harmful, harmless = (line.get_ydata() for line in fig.axes[0].get_lines()[:2])
    unit = (
        cands.diffs[CHOSEN_POSITION, CHOSEN_LAYER]
        / cands.diffs[CHOSEN_POSITION, CHOSEN_LAYER].norm()
    )
    assert harmful[CHOSEN_LAYER] - harmless[CHOSEN_LAYER] == pytest.approx(
        float(cands.diffs[CHOSEN_POSITION, CHOSEN_LAYER].norm())
    )  # along its own direction, the gap is the candidate's norm
    assert harmless == pytest.approx((cands.harmless_mean[CHOSEN_POSITION] @ unit).numpy())
