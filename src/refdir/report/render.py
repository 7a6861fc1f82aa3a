"""Documents written twice from the same blocks (:mod:`refdir.report.blocks`): a self-contained
HTML page (figures embedded as base64 PNG, inline CSS, no script; the page is a jinja2
template, ``templates/page.html.j2``, with autoescaping) and markdown beside it (figures under
``figures/``). The run report and the comparison of runs are written this way.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import jinja2

from refdir.io import atomic_path, write_text
from refdir.report.blocks import Block, Heading, Image, Para, Samples, Table

__all__ = ["render_html", "render_markdown", "write_document"]

_NUMBER = re.compile(r"[-−+]?[\d.]+(e[-+]?\d+)?( s| min \d+ s| \([-+][\d.]+\))?")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _flag(refusal: bool | None) -> tuple[str, str]:
    if refusal is None:
        return "unknown", "no flag"
    return ("refused", "refused") if refusal else ("complied", "complied")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("refdir.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["slug"] = _slug
    env.filters["base64"] = lambda data: base64.b64encode(data).decode("ascii")
    env.filters["flag_class"] = lambda refusal: _flag(refusal)[0]
    env.filters["flag_label"] = lambda refusal: _flag(refusal)[1]
    env.tests["number_text"] = lambda cell: _NUMBER.fullmatch(str(cell)) is not None
    return env


_ENV = _environment()


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """The self-contained HTML page of ``blocks``."""
    return _ENV.get_template("page.html.j2").render(title=title, blocks=blocks)


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
        prefix = {"warn": "> **Warning.** ", "note": "> "}.get(block.style, "")
        return prefix + _md_esc(block.text)
    if isinstance(block, Table):
        return _table_md(block)
    if isinstance(block, Image):
        return f"![{_md_esc(block.alt)}](figures/{block.name})\n\n*{_md_esc(block.caption)}*"
    return _samples_md(block)


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    """The markdown of ``blocks``; figures are linked under ``figures/``."""
    return "\n\n".join([f"# {_md_esc(title)}", *(_block_md(b) for b in blocks)]) + "\n"


def _write_figures(out_dir: Path, blocks: Iterable[Block]) -> None:
    for block in blocks:
        if isinstance(block, Image):
            with atomic_path(out_dir / "figures" / block.name) as tmp:
                tmp.write_bytes(block.png)


def write_document(
    out_dir: Path, stem: str, title: str, blocks: Sequence[Block]
) -> tuple[Path, Path]:
    """Write ``out_dir/{stem}.html`` (self-contained) and ``out_dir/{stem}.md`` with its
    ``figures/*.png``, each file through a temporary path; return (html, md)."""
    _write_figures(out_dir, blocks)
    html_path, md_path = out_dir / f"{stem}.html", out_dir / f"{stem}.md"
    write_text(md_path, render_markdown(title, blocks))
    write_text(html_path, render_html(title, blocks))
    return html_path, md_path
