"""Prompt sets: the packaged ones (by name) and the user's own files (JSON, JSONL, CSV, TXT)."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from refdir.errors import RefdirError

__all__ = [
    "PACKAGED_SETS",
    "check_prompts",
    "held_out_prompts",
    "load_prompts",
    "prompt_categories",
    "prompt_problem",
    "sample_prompts",
    "sample_stream",
]

PACKAGED_SETS: dict[str, str] = {
    "harmful_train": "splits/harmful_train.json",
    "harmful_val": "splits/harmful_val.json",
    "harmful_test": "splits/harmful_test.json",
    "harmless_train": "splits/harmless_train.json",
    "harmless_val": "splits/harmless_val.json",
    "harmless_test": "splits/harmless_test.json",
    "harmless_test_paper": "splits/harmless_test_paper.json",
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


def prompt_problem(text: object) -> str | None:
    """What keeps ``text`` from being a prompt (None: nothing): not a string, empty or only
    whitespace, or not valid Unicode (a lone surrogate, which no tokenizer can encode)."""
    if not isinstance(text, str):
        return f"not text but {type(text).__name__}"
    if not text:
        return "empty"
    if not text.strip():
        return "only whitespace"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"not valid Unicode text (a lone surrogate, {text[exc.start]!r}, at character "
            f"{exc.start})"
        )
    return None


def check_prompts(prompts: Iterable[str], name: str) -> list[str]:
    """The prompts as a list; a one-line error naming ``name`` (an argument, as `harmful`) and
    the prompt's index where one is not text, is empty or only whitespace, or is not valid
    Unicode, or where ``prompts`` is a single string rather than a list of them."""
    if isinstance(prompts, str | bytes):
        raise RefdirError(f"{name} is one string; give a list of prompts, e.g. [{prompts!r}]")
    prompts = list(prompts)
    for index, text in enumerate(prompts):
        problem = prompt_problem(text)
        if problem is not None:
            raise RefdirError(f"{name}[{index}] is {problem}; remove or fix it")
    return prompts


def _undecodable(path: Path, exc: UnicodeDecodeError) -> RefdirError:
    data = exc.object  # after a byte-order mark, which ``exc.start`` does not count
    line = bytes(data[: exc.start]).count(b"\n") + 1
    return RefdirError(
        f"{path}: line {line} is not UTF-8 text (byte {data[exc.start]:#04x}); "
        "save the file as UTF-8"
    )


def _json_problem(exc: ValueError | RecursionError) -> str:
    """Why ``json.loads`` refused a text: its message, or the limit it ran into."""
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return "a number too long to read"  # Python's limit on the digits of an integer


def _read_file(path: Path) -> list[tuple[str, object]]:
    """The prompts of a file, each with where it is in the file (``line 3``, ``prompt 2``)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise RefdirError(f"{path} is a folder; give a prompt file (.json, .jsonl, .csv, .txt)")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as exc:
        raise _undecodable(path, exc) from None
    except OSError as exc:
        raise RefdirError(f"cannot read {path} ({exc.strerror or exc})") from None
    if suffix == ".jsonl":
        prompts: list[tuple[str, object]] = []
        # lines end at "\n" only: JSON text may hold U+2028 or NEL unescaped (ensure_ascii=False)
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise RefdirError(
                    f"{path}: line {number} is not valid JSON ({_json_problem(exc)}); fix the file"
                ) from None
            prompts.append((f"line {number}", _from_record(record, str(path))))
        return prompts
    try:
        if suffix == ".json":
            records = json.loads(text)
            if not isinstance(records, list):
                raise RefdirError(f"{path}: expected a JSON list of prompts")
            return [
                (f"prompt {i + 1} (index {i})", _from_record(r, str(path)))
                for i, r in enumerate(records)
            ]
    except json.JSONDecodeError as exc:
        raise RefdirError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the file"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise RefdirError(f"{path}: not valid JSON ({_json_problem(exc)}); fix the file") from None
    if suffix == ".csv":
        # the csv module's own line breaks: a quoted field keeps its line breaks
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = [(f"line {reader.line_num}", row) for row in reader]
        except csv.Error as exc:
            raise RefdirError(
                f"{path}: line {reader.line_num} is not valid CSV ({exc}); fix the file"
            ) from None
        if not rows:
            return []
        key = next((k for k in _KEYS if k in rows[0][1]), None)
        if key is None:
            raise RefdirError(f"{path}: the CSV needs a column named one of {', '.join(_KEYS)}")
        return [(where, row[key] if row[key] is not None else "") for where, row in rows]
    if suffix == ".txt":
        return [
            (f"line {number}", line.strip())
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    raise RefdirError(
        f"{path}: unsupported prompt file type {suffix!r}; use .json, .jsonl, .csv or .txt"
    )


def _checked(source: object, prompts: list[tuple[str, object]]) -> list[str]:
    """The prompts, or a one-line error naming the first that is not usable and where it is."""
    texts = []
    for where, text in prompts:
        problem = prompt_problem(text)
        if problem is not None or not isinstance(text, str):
            raise RefdirError(f"{source}: {where} is {problem}; fix the file")
        texts.append(text)
    return texts


def load_prompts(name_or_path: str | Path) -> list[str]:
    """Load a packaged prompt set by name (see ``PACKAGED_SETS``) or a user file; a one-line
    error for a prompt that is empty, only whitespace or not valid Unicode text."""
    key = str(name_or_path)
    if key in PACKAGED_SETS:
        ref = resources.files("refdir.data") / PACKAGED_SETS[key]
        records = json.loads(ref.read_text(encoding="utf-8"))
        return _checked(
            key,
            [(f"prompt {i + 1} (index {i})", _from_record(r, key)) for i, r in enumerate(records)],
        )
    path = Path(key)
    if not path.exists():
        names = ", ".join(PACKAGED_SETS)
        raise RefdirError(
            f"prompts {key!r}: no such file or packaged set; packaged sets are {names}"
        )
    prompts = _checked(path, _read_file(path))
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


def sample_stream(sets: Sequence[tuple[str | Path, int | None]], seed: int = 42) -> list[list[str]]:
    """Samples of several sets drawn in order from one seeded stream, as the paper's code draws
    its four sets (``random.seed(42)`` then ``random.sample`` per set). A set asked whole
    (``None`` or at least its size) is taken in file order and draws nothing."""
    rng = random.Random(seed)
    samples = []
    for name, n in sets:
        prompts = load_prompts(name)
        if n is not None and n <= 0:
            raise RefdirError(f"the number of prompts to sample must be positive, got {n}")
        samples.append(prompts if n is None or n >= len(prompts) else rng.sample(prompts, n))
    return samples


def prompt_categories(name: str) -> dict[str, str]:
    """The category of each prompt of a packaged set that records them (JailbreakBench's ten,
    HarmBench's); empty for a set without categories or a user's file."""
    if name not in PACKAGED_SETS:
        return {}
    ref = resources.files("refdir.data") / PACKAGED_SETS[name]
    records = json.loads(ref.read_text(encoding="utf-8"))
    return {
        r["instruction"]: r["category"]
        for r in records
        if isinstance(r, dict) and isinstance(r.get("category"), str)
    }


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
