"""Corpora for the cross-entropy loss (see docs/evaluation.md): the packaged plain-text one, or
a local file of the user's.

A local file (.json list or .jsonl) holds either plain texts (strings, or records with
``text``: a copy of the Pile, say), scored on every token, or Alpaca records
(``instruction``, ``input``, ``output``), scored on the reference output after the chat-formatted
instruction. Alpaca records are taken as the paper's code takes them: the dataset shuffled as
``datasets``' ``shuffle(seed=42)`` shuffles it (numpy's ``default_rng(42).permutation``), then
the records without an input, in that order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from refdir.errors import RefdirError

__all__ = ["CORPORA", "Corpus", "load_corpus", "read_corpus"]

CORPORA: dict[str, str] = {"prose": "corpus/prose.json"}
"""Packaged corpora, by name: their files under ``refdir/data``."""

ALPACA_SEED = 42
"""The seed of the paper's shuffle of Alpaca."""


@dataclass(frozen=True)
class Corpus:
    """Texts to score: plain texts, or instructions with their reference ``outputs``."""

    name: str
    texts: list[str]
    outputs: list[str] | None = None


def _records(path: Path) -> list[object]:
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RefdirError(f"corpus {path} is not readable JSON ({exc}); fix the file") from None
    if not isinstance(records, list):
        raise RefdirError(f"corpus {path}: expected a JSON list of texts or records")
    return records


def _from_file(path: Path) -> Corpus:
    records = _records(path)
    if records and all(isinstance(r, dict) and "output" in r for r in records):
        order = np.random.default_rng(ALPACA_SEED).permutation(len(records))
        kept = [records[i] for i in order if not str(records[i].get("input", "")).strip()]
        pairs = [(r.get("instruction"), r.get("output")) for r in kept]
        if not pairs or not all(isinstance(a, str) and isinstance(b, str) for a, b in pairs):
            raise RefdirError(
                f"corpus {path}: Alpaca records need text `instruction` and `output` fields and "
                "at least one record without an `input`"
            )
        return Corpus(str(path), [str(a) for a, _ in pairs], [str(b) for _, b in pairs])
    texts = [r.get("text") if isinstance(r, dict) else r for r in records]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise RefdirError(
            f"corpus {path}: give a list of texts (strings or records with `text`) or Alpaca "
            "records (`instruction`, `input`, `output`)"
        )
    return Corpus(str(path), [str(t) for t in texts])


def read_corpus(name: str = "prose", n: int | None = None) -> Corpus:
    """A packaged corpus by name, or a local file (the first ``n`` items when given)."""
    if name in CORPORA:
        text = (resources.files("refdir.data") / CORPORA[name]).read_text(encoding="utf-8")
        corpus = Corpus(name, [str(t) for t in json.loads(text)["texts"]])
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise RefdirError(
                f"unknown corpus {name!r}; use one of {', '.join(CORPORA)} or a local .json or "
                ".jsonl file of texts or Alpaca records"
            )
        corpus = _from_file(path)
    if n is None:
        return corpus
    outputs = corpus.outputs[:n] if corpus.outputs is not None else None
    return Corpus(corpus.name, corpus.texts[:n], outputs)


def load_corpus(name: str = "prose", n: int | None = None) -> list[str]:
    """The plain texts of a corpus (the first ``n`` when given); an Alpaca file is an error
    here, since its outputs are scored after their instructions (:func:`read_corpus`)."""
    corpus = read_corpus(name, n)
    if corpus.outputs is not None:
        raise RefdirError(f"corpus {name} holds instructions with outputs, not plain texts")
    return corpus.texts
