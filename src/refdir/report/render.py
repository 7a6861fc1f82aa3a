"""Documents built as a short list of blocks (headings, paragraphs, tables, figures,
completion samples) and rendered twice: to a self-contained HTML file (figures embedded as
base64 PNG, inline CSS, no script) and to markdown beside it (figures under ``figures/``), so
both say the same. The run report and the comparison of runs are written this way.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refdir.direction import atomic_path

__all__ = [
    "Block",
    "Heading",
    "Image",
    "Para",
    "Raw",
    "Sample",
    "Samples",
    "Table",
    "fmt",
    "key_value_table",
    "markdown_section",
    "render_markdown",
    "seconds",
    "truncate_text",
    "with_change",
    "write_document",
]


IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
}


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


def fmt(value: Any) -> str:
    """A value as a table shows it: three decimals, ``—`` for a missing one (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
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


def with_change(value: Any, base: Any) -> str:
    """``value`` and, when both are numbers, its change from ``base`` in brackets."""
    if not isinstance(value, int | float) or not isinstance(base, int | float):
        return fmt(value)
    return f"{fmt(value)} ({value - base:+.3f})"


def seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return fmt(value)
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


def key_value_table(data: Mapping[str, Any], caption: str = "") -> Table:
    return Table(["", ""], [[key, fmt(value)] for key, value in _flatten(data)], caption)


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


def markdown_section(text: str, base_dir: Path) -> list[Block]:
    """The extra section: its leading ``#`` heading (or "Additional analysis") becomes a
    section of the report; the rest is rendered one heading level down."""
    lines = text.strip().splitlines()
    first = _HEADING.match(lines[0]) if lines else None
    if first and len(first.group(1)) == 1:
        title, body = first.group(2), "\n".join(lines[1:]).strip()
    else:
        title, body = "Additional analysis", "\n".join(lines)
    rendered = render_markdown(body, base_dir, shift_headings=1)
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


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
    _write_text(md_path, _md_document(title, blocks))
    _write_text(html_path, _html_document(title, blocks))
    return html_path, md_path
