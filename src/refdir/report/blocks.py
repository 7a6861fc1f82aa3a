"""The blocks a document is made of (headings, paragraphs, tables, figures, completion samples)
and the formatting of the values they show. Every section of the run report and of the
comparison returns a list of blocks; :mod:`refdir.report.render` writes them as HTML and as
markdown, so both say the same."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Block",
    "Heading",
    "Image",
    "Para",
    "Sample",
    "Samples",
    "Table",
    "fmt",
    "key_value_table",
    "seconds",
    "truncate_text",
    "with_change",
]


@dataclass(frozen=True)
class Heading:
    kind: ClassVar[str] = "heading"
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    kind: ClassVar[str] = "para"
    text: str
    style: str = ""
    """"", "note" or "warn"."""
    id: str = ""
    """An anchor for the paragraph (the report's summary is ``summary``)."""


@dataclass(frozen=True)
class Table:
    kind: ClassVar[str] = "table"
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""
    id: str = ""
    """An anchor for the table (the chosen direction's is ``chosen``)."""

    @property
    def key_value(self) -> bool:
        """A table with an empty header is a key/value list (no header, text aligned)."""
        return all(not h for h in self.header)


@dataclass(frozen=True)
class Image:
    kind: ClassVar[str] = "image"
    name: str
    """The file name under ``figures/`` beside the markdown."""
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
    kind: ClassVar[str] = "samples"
    title: str
    items: Sequence[Sample]


Block = Heading | Para | Table | Image | Samples


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
    """Seconds as ``12.3 s`` or ``2 min 05 s``."""
    if not isinstance(value, int | float):
        return fmt(value)
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(float(value), 60.0)
    return f"{int(minutes)} min {rest:.0f} s"


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
    """A key/value list of ``data``, nested keys joined with dots."""
    return Table(["", ""], [[key, fmt(value)] for key, value in _flatten(data)], caption)
