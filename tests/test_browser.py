"""The pages users open, in a real browser: ``report.html`` of a finished run and
``comparison.html`` of a comparison, in headless Chromium at 1280x800.

Each page must show every figure (loaded and decoded, as many as its markdown twin lists), log
no console error and raise no page error, not scroll sideways, and show its summary (the report
also its chosen-direction table). ``test_the_checks_catch_a_broken_page`` feeds the same checks
a deliberately broken page, so they cannot pass vacuously.

Chromium is the system's (Debian's ``chromium``), driven by ``playwright``; no browser is
downloaded. Without either the tests skip, unless ``REFDIR_REQUIRE_BROWSER=1`` (CI sets it), in
which case they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from refdir.report.compare import write_comparison

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_ARGS = [
    # playwright adds --headless, --no-first-run, --disable-sync, --disable-component-update,
    # --disable-background-networking and a fresh temporary profile (--user-data-dir) itself
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
]
MD_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+\.png)\)")


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _unavailable(why: str) -> NoReturn:
    if os.environ.get("REFDIR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why}, and REFDIR_REQUIRE_BROWSER=1 asks for the browser test")
    pytest.skip(f"{why}; install Debian's chromium and the dev extra to run the browser test")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not importable")
    executable = _chromium()
    if executable is None:
        _unavailable("no Chromium binary (chromium on PATH or /usr/bin/chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Opened:
    """A page loaded in the browser, with the errors it logged while loading."""

    page: Page
    errors: list[str] = field(default_factory=list)


def open_page(browser: Browser, path: Path) -> Opened:
    page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
    opened = Opened(page)

    def on_console(message: Any) -> None:
        if message.type == "error":
            opened.errors.append(f"console error: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: opened.errors.append(f"page error: {error}"))
    page.goto(path.as_uri(), wait_until="load")
    return opened


# The checks, shared by the real pages and the broken one.


def images(page: Page) -> list[dict[str, Any]]:
    """Every ``<img>``: its alt text, whether it loaded and decoded, its natural width, and
    whether it sits in a ``<figure>``."""
    found: list[dict[str, Any]] = page.evaluate(
        """() => Array.from(document.images).map(i => ({
            alt: i.alt, ok: i.complete && i.naturalWidth > 0, width: i.naturalWidth,
            in_figure: i.closest('figure') !== null}))"""
    )
    return found


def sideways_overflow(page: Page) -> dict[str, Any]:
    """How far the page is wider than the window (``excess`` > 0: it scrolls sideways), with the
    elements that stick out, for the message."""
    found: dict[str, Any] = page.evaluate(
        """() => {
            const root = document.documentElement;
            const width = Math.min(root.clientWidth, window.innerWidth);
            const out = Array.from(document.querySelectorAll('body *'))
                .filter(e => e.getBoundingClientRect().right > width + 0.5)
                .slice(0, 5)
                .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')
                     + (e.className ? '.' + e.className : '')
                     + ' ' + Math.round(e.getBoundingClientRect().width) + 'px');
            return {excess: root.scrollWidth - width, scroll_width: root.scrollWidth,
                    window: width, sticking_out: out};
        }"""
    )
    return found


def png_width(path: Path) -> int:
    """The width in a PNG's IHDR header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int(struct.unpack(">I", head[16:20])[0])


def check_figures(opened: Opened, markdown: Path) -> None:
    """The page shows, in order, the figures its markdown twin lists, each decoded at the
    width of the PNG beside the markdown."""
    listed = MD_IMAGE.findall(markdown.read_text())
    assert listed, f"{markdown.name} lists no figure: nothing to check"
    shown = images(opened.page)
    broken = [i["alt"] for i in shown if not i["ok"]]
    assert not broken, f"images that did not load: {broken}"
    assert [i["alt"] for i in shown] == [alt for alt, _ in listed]
    assert all(i["in_figure"] for i in shown)
    assert opened.page.locator("figure").count() == len(listed)
    widths = [png_width(markdown.parent / png) for _, png in listed]
    assert [i["width"] for i in shown] == widths


def check_no_errors(opened: Opened) -> None:
    assert not opened.errors, "\n".join(opened.errors)


def check_no_sideways_scroll(opened: Opened) -> None:
    overflow = sideways_overflow(opened.page)
    assert overflow["window"] == VIEWPORT["width"], overflow
    assert overflow["excess"] <= 0, f"the page scrolls sideways at 1280 px: {overflow}"


def check_in_view(opened: Opened, selector: str) -> None:
    """``selector`` is shown, with text, within the width of the window."""
    element = opened.page.locator(selector)
    assert element.count() == 1, f"{selector}: {element.count()} elements"
    assert element.is_visible(), f"{selector} is not visible"
    assert element.inner_text().strip(), f"{selector} is empty"
    box = element.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"], box


# The pages.


@pytest.fixture(scope="module")
def report_page(browser: Browser, finished_run: Path) -> Iterator[Opened]:
    opened = open_page(browser, finished_run / "report.html")
    yield opened
    opened.page.close()


@pytest.fixture(scope="module")
def comparison_dir(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser_comparison")
    copy = Path(shutil.copytree(finished_run, root / "b"))
    write_comparison([finished_run, copy], root / "comparison", ["a", "b"])
    return root / "comparison"


@pytest.fixture(scope="module")
def comparison_page(browser: Browser, comparison_dir: Path) -> Iterator[Opened]:
    opened = open_page(browser, comparison_dir / "comparison.html")
    yield opened
    opened.page.close()


@pytest.fixture(params=["report", "comparison"])
def page_and_markdown(
    request: pytest.FixtureRequest, browser: Browser, finished_run: Path, comparison_dir: Path
) -> tuple[Opened, Path]:
    """One of the two pages (``browser`` first: skip before building the comparison)."""
    if request.param == "report":
        return request.getfixturevalue("report_page"), finished_run / "report.md"
    return request.getfixturevalue("comparison_page"), comparison_dir / "comparison.md"


def test_every_figure_loads(page_and_markdown: tuple[Opened, Path]) -> None:
    opened, markdown = page_and_markdown
    check_figures(opened, markdown)


def test_no_console_or_page_errors(page_and_markdown: tuple[Opened, Path]) -> None:
    check_no_errors(page_and_markdown[0])


def test_no_sideways_scroll_at_1280(page_and_markdown: tuple[Opened, Path]) -> None:
    check_no_sideways_scroll(page_and_markdown[0])


def test_report_shows_summary_and_chosen_direction(report_page: Opened, finished_run: Path) -> None:
    layer = json.loads((finished_run / "metrics.json").read_text())["direction"]["layer"]
    check_in_view(report_page, "#summary")
    assert f"layer {layer}," in report_page.page.locator("#summary").inner_text()
    check_in_view(report_page, "#chosen")
    cell = report_page.page.locator(
        '#chosen tr:has(td:first-child:text-is("layer")) td:nth-child(2)'
    )
    assert cell.count() == 1
    assert cell.is_visible()
    assert cell.inner_text().startswith(f"{layer} of ")


def test_comparison_shows_summary(comparison_page: Opened) -> None:
    check_in_view(comparison_page, "#summary")
    assert comparison_page.page.locator("#summary").inner_text().startswith("2 runs.")


def test_a_comparison_of_many_runs_fits_1280(
    browser: Browser, finished_run: Path, tmp_path: Path
) -> None:
    """Twelve runs with long labels: the tables grow, the page must not."""
    runs = [finished_run] + [
        Path(shutil.copytree(finished_run, tmp_path / f"run{i}")) for i in range(11)
    ]
    labels = [f"meta-llama/Llama-3.1-8B-Instruct, variant {i}" for i in range(12)]
    write_comparison(runs, tmp_path / "comparison", labels)
    opened = open_page(browser, tmp_path / "comparison" / "comparison.html")
    try:
        check_no_sideways_scroll(opened)
        check_no_errors(opened)
        check_figures(opened, tmp_path / "comparison" / "comparison.md")
        check_in_view(opened, "#summary")
    finally:
        opened.page.close()


BROKEN_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<p id="summary" style="display:none">hidden</p>
<figure><img src="data:image/png;base64,AAAA" alt="Broken"></figure>
<div style="width:3000px">too wide</div>
<script>console.error("logged"); throw new Error("thrown");</script>
</body></html>"""


def test_the_checks_catch_a_broken_page(browser: Browser, tmp_path: Path) -> None:
    """A broken image, a 3000 px div, a hidden summary, a logged and a thrown error: each
    check fails on the page that has it."""
    html = tmp_path / "broken.html"
    html.write_text(BROKEN_PAGE)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "broken.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", 8, 8)
    )
    markdown = tmp_path / "broken.md"
    markdown.write_text("![Broken](figures/broken.png)\n")
    opened = open_page(browser, html)
    try:
        assert images(opened.page) == [
            {"alt": "Broken", "ok": False, "width": 0, "in_figure": True}
        ]
        with pytest.raises(AssertionError, match="did not load"):
            check_figures(opened, markdown)
        with pytest.raises(AssertionError, match="scrolls sideways"):
            check_no_sideways_scroll(opened)
        with pytest.raises(AssertionError, match="console error: logged"):
            check_no_errors(opened)
        assert any("page error: " in e and "thrown" in e for e in opened.errors)
        with pytest.raises(AssertionError, match="not visible"):
            check_in_view(opened, "#summary")
    finally:
        opened.page.close()
