"""Prompt sets: the packaged ones (by name) and the user's own files (JSON, JSONL, CSV, TXT)."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from refdir.errors import RefdirError

__all__ = ["PACKAGED_SETS", "held_out_prompts", "load_prompts", "sample_prompts"]

PACKAGED_SETS: dict[str, str] = {
    "harmful_train": "splits/harmful_train.json",
    "harmful_val": "splits/harmful_val.json",
    "harmful_test": "splits/harmful_test.json",
    "harmless_train": "splits/harmless_train.json",
    "harmless_val": "splits/harmless_val.json",
    "harmless_test": "splits/harmless_test.json",
    "jailbreakbench": "eval/jailbreakbench.json",
    "harmbench_test": "eval/harmbench_test.json",
    "harmbench_val": "eval/harmbench_val.json",
    "advbench": "eval/advbench.json",
    "malicious_instruct": "eval/malicious_instruct.json",
    "tdc2023": "eval/tdc2023.json",
}

_KEYS = ("instruction", "prompt", "goal", "behavior", "text")


def _from_record(record: object, source: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in _KEYS:
            value = record.get(key)
            if isinstance(value, str):
                return value
    raise RefdirError(
        f"{source}: a record has no instruction text; give strings or objects with one of "
        f"the keys {', '.join(_KEYS)}"
    )


def _read_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if path.is_dir():
        raise RefdirError(f"{path} is a folder; give a prompt file (.json, .jsonl, .csv, .txt)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (spreadsheets) is dropped
    except UnicodeDecodeError:
        raise RefdirError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise RefdirError(f"cannot read {path} ({exc.strerror or exc})") from None
    if suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RefdirError(
                    f"{path}: line {number} is not valid JSON ({exc.msg}); fix the file"
                ) from None
            prompts.append(_from_record(record, str(path)))
        return prompts
    try:
        if suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise RefdirError(f"{path}: expected a JSON list of prompts")
            return [_from_record(r, str(path)) for r in data]
    except json.JSONDecodeError as exc:
        raise RefdirError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the file"
        ) from None
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows:
            return []
        key = next((k for k in _KEYS if k in rows[0]), None)
        if key is None:
            raise RefdirError(f"{path}: the CSV needs a column named one of {', '.join(_KEYS)}")
        return [row[key] for row in rows]
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    raise RefdirError(
        f"{path}: unsupported prompt file type {suffix!r}; use .json, .jsonl, .csv or .txt"
    )


def load_prompts(name_or_path: str | Path) -> list[str]:
    """Load a packaged prompt set by name (see ``PACKAGED_SETS``) or a user file."""
    key = str(name_or_path)
    if key in PACKAGED_SETS:
        ref = resources.files("refdir.data") / PACKAGED_SETS[key]
        return [_from_record(r, key) for r in json.loads(ref.read_text(encoding="utf-8"))]
    path = Path(key)
    if not path.exists():
        names = ", ".join(PACKAGED_SETS)
        raise RefdirError(
            f"prompts {key!r}: no such file or packaged set; packaged sets are {names}"
        )
    prompts = _read_file(path)
    if not prompts:
        raise RefdirError(f"{path}: contains no prompts")
    return prompts


def sample_prompts(name_or_path: str | Path, n: int | None, seed: int = 0) -> list[str]:
    """Up to ``n`` prompts from a set, sampled without replacement with a fixed seed (all if None)."""
    prompts = load_prompts(name_or_path)
    if n is None or n >= len(prompts):
        return prompts
    if n <= 0:
        raise RefdirError(f"the number of prompts to sample must be positive, got {n}")
    return random.Random(seed).sample(prompts, n)


def held_out_prompts(name: str, n: int | None, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """Up to ``n`` prompts of a set (seeded sample) that are not in ``exclude``."""
    banned = set(exclude)
    pool = [p for p in load_prompts(name) if p not in banned]
    if not pool:
        raise RefdirError(f"no held-out prompts left in {name} after removing the search set")
    if n is not None and n <= 0:
        raise RefdirError(f"the number of held-out prompts must be positive, got {n}")
    if n is None or n >= len(pool):
        return pool
    return random.Random(seed).sample(pool, n)
