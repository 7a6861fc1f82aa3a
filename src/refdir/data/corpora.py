"""Packaged plain-text corpora, for the cross-entropy loss on text (see docs/evaluation.md)."""

from __future__ import annotations

import json
from importlib import resources

from refdir.errors import RefdirError

__all__ = ["CORPORA", "load_corpus"]

CORPORA: dict[str, str] = {"prose": "corpus/prose.json"}
"""Packaged corpora, by name: their files under ``refdir/data``."""


def load_corpus(name: str = "prose", n: int | None = None) -> list[str]:
    """The texts of a packaged corpus (the first ``n`` when given)."""
    if name not in CORPORA:
        raise RefdirError(f"unknown corpus {name!r}; use one of {', '.join(CORPORA)}")
    text = (resources.files("refdir.data") / CORPORA[name]).read_text(encoding="utf-8")
    texts = [str(t) for t in json.loads(text)["texts"]]
    return texts if n is None else texts[:n]
