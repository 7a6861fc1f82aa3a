"""Property tests of the readers of what users and runs hand refdir: prompt files, direction
files, layout files and the typed files of a run folder. Any input gives either a valid object
or a :class:`RefdirError` of one line, never another exception (a traceback)."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from refdir.artifacts.base import Artifact
from refdir.artifacts.direction import DirectionRecord
from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.run import ConfigRecord, TimingsRecord
from refdir.artifacts.schemas import ARTIFACTS
from refdir.data import load_prompts
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.model.layout_spec import LayoutSpec, read_layout

T = TypeVar("T")

SETTINGS = settings(max_examples=150, deadline=None, database=None)
"""About 150 examples a property (the whole file runs in seconds); no example database in the
work tree: the crashes found are kept below as explicit examples."""

OLD_RUN = Path(__file__).parent / "data" / "run-0.1.0"
SUFFIX_FILES = {"suffix.json", "history.json", "analysis.json"}
SAMPLES: dict[str, dict[str, Any]] = {
    # the monitor step's, as a tiny run with --suffix writes it
    "monitor.json": json.loads((Path(__file__).parent / "data/samples/monitor.json").read_text()),
    "directions.json": {  # refdir compare-directions'
        "a": {
            "label": "organism",
            "source": "runs/organism",
            "model": "organism",
            "layer": 22,
            "position": -1,
            "norm": 103.0,
            "projections": {
                "harmful_own": [0.0, 72.8],
                "harmless_own": [0.0, -10.2],
                "harmful_other": [0.0, 99.5],
                "harmless_other": [0.0, 44.9],
            },
            "rates": {
                "harmful_baseline": 1.0,
                "harmful_ablate_own": 0.0,
                "harmful_ablate_other": 0.0,
                "harmless_baseline": 0.0625,
                "harmless_add_own": 1.0,
                "harmless_add_other": 0.3125,
            },
        },
        "b": {
            "label": "base",
            "source": "runs/base",
            "model": "base.gguf",
            "layer": 22,
            "position": -1,
            "norm": 54.0,
        },
        "d_model": 576,
        "cosine": 0.573,
        "position": -1,
        "cosine_by_layer": [None, 1.0],
        "harmful": "harmful_test",
        "harmless": "harmless_test",
        "n_harmful": 16,
        "n_harmless": 16,
        "max_new_tokens": 32,
        "seconds": 1814.0,
    },
    "benchmarks.json": {
        "tasks": ["arc_easy"],
        "limit": 10,
        "scores": {"arc_easy": {"acc": {"baseline": 0.5, "ablation": 0.4}}},
    },
    "refdir-run.json": {"refdir_run": 1, "created_by": "0.2.0"},  # the run folder's marker
    "pareto.json": {  # refdir optimize's, beside a run's files
        "model": "organism",
        "methods": ["weights", "projected"],
        "storage": "runs/opt/optuna-journal.log",
        "study": "refdir-optimize",
        "trials": 3,
        "search_seconds": 6.5,
        "trial_seconds": 2.1,
        "position": -1,
        "ce_baseline": 4.6,
        "paper": {
            "trial": None,
            "label": "paper",
            "params": {"index": 22.0, "projected": False},
            "refusal_score": 0.01,
            "refusal_first_token": 0.0,
            "kl": 0.11,
            "refusal_generated": 0.0,
            "ce_text": 4.61,
        },
        "points": [
            {
                "trial": 2,
                "label": "trial 2",
                "params": {"index": 24.5, "projected": True},
                "refusal_score": 0.009,
                "refusal_first_token": 0.0,
                "kl": 0.04,
                "refusal_generated": 0.0,
                "ce_text": 4.6,
            }
        ],
        "agreement": {
            "n": 1,
            "mean_abs_difference": 0.0,
            "rank_correlation": None,
            "same_side": 1.0,
        },
        "rule": "the knee of the front",
        "chosen": 0,
    },
    "heldout.json": {
        "harmful_sets": ["harmful_test"],
        "n_harmful": 2,
        "n_harmless": 2,
        "max_new_tokens": 8,
        "long_tokens": None,
        "results": [
            {
                "label": "none",
                "refusal_harmful": 1.0,
                "refusal_harmful_long": None,
                "refusal_harmless": 0.0,
                "kl_mean": 0.0,
                "kl_median": 0.0,
                "ce_text": 4.6,
                "ce_own_completions": 0.4,
                "actadd_harmless_refusal": None,
            }
        ],
    },
}
"""Valid files of the kinds that the run folder of refdir 0.1.0 lacks."""

DEEP = b"[" * 100_000
"""JSON nested past Python's recursion limit (json.loads raises RecursionError)."""
LONG_INT = b"1" * 5_000
"""An integer of more digits than Python converts (json.loads raises a plain ValueError)."""


def _sample(artifact: type[Artifact]) -> dict[str, Any]:
    """A valid file of ``artifact`` (the run folder of refdir 0.1.0 kept in tests/data, or
    ``SAMPLES``)."""
    if artifact.FILE in SAMPLES:
        return SAMPLES[artifact.FILE]
    path = (OLD_RUN / "suffix" if artifact.FILE in SUFFIX_FILES else OLD_RUN) / artifact.FILE
    assert path.is_file(), f"no valid {artifact.FILE} to change: add one to SAMPLES"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# -- strategies ----------------------------------------------------------------------------

JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
"""Any JSON value (NaN and infinities too, which Python's json reads and writes)."""

JSON_OBJECTS = st.dictionaries(st.text(max_size=10), JSON, max_size=6)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with one change somewhere in it: a value replaced by any JSON value, a key or
    item dropped, or one added."""
    if isinstance(value, dict) and value:
        op = draw(st.sampled_from(["descend", "descend", "descend", "replace", "drop", "add"]))
        key = draw(st.sampled_from(sorted(value)))
        if op == "descend":
            return {**value, key: draw(mutated(value[key]))}
        if op == "drop":
            return {k: v for k, v in value.items() if k != key}
        if op == "add":
            return {**value, draw(st.text(max_size=10)): draw(JSON)}
    if isinstance(value, list) and value:
        op = draw(st.sampled_from(["descend", "descend", "replace", "drop", "add"]))
        index = draw(st.integers(0, len(value) - 1))
        if op == "descend":
            return [*value[:index], draw(mutated(value[index])), *value[index + 1 :]]
        if op == "drop":
            return value[:index] + value[index + 1 :]
        if op == "add":
            return [*value, draw(JSON)]
    return draw(JSON)


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of any small shape (0-d, empty, 2-d) and dtype, with ordinary, zero, NaN or
    infinite values."""
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    fill = draw(st.sampled_from(["randn", "zeros", "nan", "inf"]))
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if fill != "randn":
        tensor = torch.full(shape, {"zeros": 0.0, "nan": float("nan"), "inf": float("inf")}[fill])
    return tensor.to(draw(st.sampled_from(DTYPES)))


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A safetensors file of any tensors, or one with any JSON header and data."""
    if draw(st.booleans()):
        name = draw(st.sampled_from(["direction", "direction", "other"]))
        return _tensor_bytes({name: draw(tensors())})
    header = draw(JSON_OBJECTS | mutated({"direction": _HEADER}))
    return _header_file(header, draw(st.binary(max_size=64)))


_HEADER = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


def _header_file(header: dict[str, Any], data: bytes = b"") -> bytes:
    """A safetensors file of this header (as JSON) and data."""
    text = _dumps(header)
    return struct.pack("<Q", len(text)) + text + data


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder each example fills anew (examples run one after another)."""
    yield tmp_path_factory.mktemp("readers")


def _fill(folder: Path, files: dict[str, bytes | None]) -> Path:
    """``folder`` emptied, then holding ``files`` (None: the file is absent)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    return folder


def valid_or_one_line(read: Callable[[], T]) -> T | None:
    """What ``read`` returns, or None for a one-line :class:`RefdirError`; any other exception
    (or an error of several lines) fails the test."""
    try:
        value = read()
    except RefdirError as exc:
        message = str(exc)
        assert message.splitlines() == [message], message  # not \n, \r, \x85, U+2028...
        event("refused")
        return None
    event("read")
    return value


# -- prompt files --------------------------------------------------------------------------

SUFFIXES = [".json", ".jsonl", ".csv", ".txt"]
_PROMPT_PIECES = st.sampled_from([*"ab ,;\"'\n\r\t{}[]:\x00\x1b\u2028\x85", "\\ud800", "prompt"])


def _prompt_bytes(suffix: str) -> st.SearchStrategy[bytes]:
    """Any bytes, any text, any JSON; and text near the format (keys, quotes, separators)."""
    near = st.lists(_PROMPT_PIECES, max_size=30).map("".join)
    if suffix == ".csv":
        near = st.tuples(st.sampled_from(["prompt\n", "x,goal\n", ""]), near).map("".join)
    keyed = st.lists(
        st.dictionaries(st.sampled_from(["prompt", "goal", "x"]), JSON, max_size=2) | JSON,
        max_size=4,
    )
    if suffix == ".jsonl":
        lines = keyed.map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode())
    else:
        lines = keyed.map(_dumps)
    return st.one_of(
        st.binary(max_size=80), st.text(max_size=40).map(str.encode), near.map(str.encode), lines
    )


PROMPT_FILES = st.sampled_from(SUFFIXES).flatmap(
    lambda suffix: st.tuples(st.just(suffix), _prompt_bytes(suffix))
)


@SETTINGS
@given(case=PROMPT_FILES)
@example(case=(".csv", b",goal\n\x00")).via("found before this branch: a short row's None")
def test_prompt_files_of_any_bytes(scratch: Path, case: tuple[str, bytes]) -> None:
    suffix, body = case
    path = _fill(scratch, {f"p{suffix}": body}) / f"p{suffix}"
    prompts = valid_or_one_line(lambda: load_prompts(path))
    if prompts is not None:
        assert prompts and all(isinstance(p, str) and p.strip() for p in prompts)
        for prompt in prompts:
            prompt.encode("utf-8")  # no lone surrogate: a tokenizer takes every prompt


PROMPTS = st.lists(st.text(min_size=1, max_size=20).filter(str.strip), min_size=1, max_size=5)


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES), prompts=PROMPTS)
@example(suffix=".csv", prompts=["\x0c0"]).via("found: a form feed split the CSV row")
@example(suffix=".csv", prompts=["0\r"]).via("found: a quoted CR was lost")
@example(suffix=".jsonl", prompts=["0\x85"]).via("found: NEL (raw in JSON) split the JSONL line")
@example(suffix=".csv", prompts=["a\nb"]).via("a quoted line break was lost")
@example(suffix=".jsonl", prompts=["a\u2028b"]).via("U+2028 (raw in JSON) split the JSONL line")
def test_prompt_files_written_by_the_usual_writers_read_back_the_same(
    scratch: Path, suffix: str, prompts: list[str]
) -> None:
    """A file that Python's json or csv module (or a text editor) writes reads back to the
    prompts written; a .txt file holds one stripped prompt per line."""
    if suffix == ".txt":
        prompts = [p.strip() for p in prompts if len(p.strip().splitlines()) == 1]
        if not prompts:
            return
        text = "".join(p + "\n" for p in prompts)
    elif suffix == ".json":
        text = json.dumps(prompts, ensure_ascii=False)
    elif suffix == ".jsonl":
        text = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
    else:
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerows([["id", "prompt"], *([str(i), p] for i, p in enumerate(prompts))])
        text = buffer.getvalue()
    path = _fill(scratch, {f"p{suffix}": text.encode()}) / f"p{suffix}"
    assert load_prompts(path) == prompts


# -- direction files -----------------------------------------------------------------------

_FILES = st.none() | st.binary(max_size=64)


@SETTINGS
@given(
    vector=_FILES | safetensors_files(),
    record=_FILES | JSON.map(_dumps) | mutated(_sample(DirectionRecord)).map(_dumps),
)
@example(vector=_header_file({"direction": _HEADER, "": ["\x1e"]}), record=None).via(
    "found: safetensors quotes a header's control character in its message"
)
def test_direction_files_of_any_bytes(scratch: Path, vector: bytes | None, record: Any) -> None:
    folder = _fill(scratch, {"direction.safetensors": vector, "direction.json": record})
    direction = valid_or_one_line(lambda: Direction.load(folder))
    if direction is not None:
        assert direction.vector.dim() == 1 and direction.vector.is_floating_point()


@SETTINGS
@given(vector=tensors(), record=JSON_OBJECTS | mutated(_sample(DirectionRecord)))
@example(
    vector=torch.ones(3), record={**_sample(DirectionRecord), "metadata": {"b": 1, "": None}}
).via("found: a test slip (direction.json sorts its keys), not a bug")
def test_a_tensor_with_any_direction_record(
    scratch: Path, vector: torch.Tensor, record: dict[str, Any]
) -> None:
    tensor = _tensor_bytes({"direction": vector})
    folder = _fill(scratch, {"direction.safetensors": tensor, "direction.json": _dumps(record)})
    direction = valid_or_one_line(lambda: Direction.load(folder))
    if direction is not None:
        assert direction.vector.dim() == 1 and direction.position < 0 <= direction.layer
        (folder / "again").mkdir()
        direction.save(folder / "again")  # what loads, saves and loads again
        again = Direction.load(folder / "again").record().dump()
        first = {**direction.record().dump(), "norm": 0}  # the norm of the float32 copy differs
        assert json.dumps({**again, "norm": 0}, sort_keys=True) == json.dumps(first, sort_keys=True)


# -- layout files --------------------------------------------------------------------------

LAYOUT_FIELDS = ["layers", "attn", "mlp", "attn_out", "mlp_out", "final_norm", "mpl"]
PATTERNS = st.text(st.sampled_from(list("ab(|)[]{}*+?.\\^$0123456789,:<>=!P-\n\x1e")), max_size=16)


@SETTINGS
@given(
    body=st.binary(max_size=64)
    | JSON.map(_dumps)
    | st.dictionaries(st.sampled_from(LAYOUT_FIELDS), PATTERNS | JSON, max_size=3).map(_dumps)
)
def test_layout_files_of_any_bytes(scratch: Path, body: bytes) -> None:
    path = _fill(scratch, {"layout.json": body}) / "layout.json"
    spec = valid_or_one_line(lambda: LayoutSpec.from_fields(read_layout(path)))
    assert spec is None or isinstance(spec, LayoutSpec)


# -- the typed files of a run --------------------------------------------------------------

ARTIFACT_NAMES = [a.__name__ for a in ARTIFACTS]
BY_NAME = {a.__name__: a for a in ARTIFACTS}


def _finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _reads_back(artifact: type[Artifact], record: Artifact, folder: Path) -> None:
    """What reads writes back to a file that reads the same. Not where the record holds NaN or
    an infinity: pydantic writes those as null, which a list of floats then refuses (open)."""
    if not _finite(record.model_dump()):
        event("non-finite: not written back")
        return
    again = artifact.read(_fill(folder / "again", {artifact.FILE: record.text().encode()}))
    assert again.text() == record.text()


def _read(artifact: type[Artifact], folder: Path, body: bytes) -> None:
    _fill(folder, {artifact.FILE: body})
    record = valid_or_one_line(lambda: artifact.read(folder))
    if record is not None:
        _reads_back(artifact, record, folder)
    if artifact is TimingsRecord:  # the lenient reader of timings.json: never an error
        assert isinstance(TimingsRecord.read_lenient(folder), TimingsRecord)


@SETTINGS
@given(name=st.sampled_from(ARTIFACT_NAMES), body=st.binary(max_size=80) | JSON.map(_dumps))
def test_run_files_of_any_bytes_or_json(scratch: Path, name: str, body: bytes) -> None:
    _read(BY_NAME[name], scratch, body)


CHANGED = st.sampled_from(ARTIFACT_NAMES).flatmap(
    lambda name: st.tuples(st.just(name), mutated(_sample(BY_NAME[name])))
)


@SETTINGS
@given(case=CHANGED)
@example(case=("ConfigRecord", {**_sample(ConfigRecord), "\n": None})).via("found: a key of \\n")
@example(case=("MetricsRecord", {**_sample(MetricsRecord), "\u2028": 0})).via("U+2028 too")
def test_run_files_changed_in_one_place(scratch: Path, case: tuple[str, Any]) -> None:
    """A valid file of each kind with one value replaced, dropped or added, anywhere in it."""
    name, data = case
    _read(BY_NAME[name], scratch, _dumps(data))


# -- inputs the properties do not reach by chance (too large, or too particular) ----------

_TENSOR = _tensor_bytes({"direction": torch.ones(4)})
UNLIKELY: dict[str, tuple[str, bytes]] = {
    "prompts: JSON nested too deep": ("p.json", DEEP),
    "prompts: JSONL line of a too long integer": ("p.jsonl", LONG_INT),
    "prompts: CSV field over the csv module's limit": ("p.csv", b"prompt\n" + b"x" * 200_000),
    "direction record nested too deep": ("direction.json", DEEP),
    "direction record of a too long integer": ("direction.json", b'{"layer": ' + LONG_INT + b"}"),
    "layout nested too deep": ("layout.json", DEEP),
    "layout of a too long integer": ("layout.json", b'{"mlp": ' + LONG_INT + b"}"),
    "layout repeat count past re's limit": ("layout.json", b'{"mlp": "a{4294967296}"}'),
    "layout pattern nested past re's limit": (
        "layout.json",
        b'{"mlp": "' + b"(" * 1000 + b")" * 1000 + b'"}',
    ),
    "layout pattern whose re error quotes a control character": (
        "layout.json",
        b'{"mlp": "[z-\\u001e]"}',
    ),
    "metrics nested too deep": ("metrics.json", DEEP),
    "config of a too long integer": ("config.json", b'{"options": ' + LONG_INT + b"}"),
}


@pytest.mark.parametrize("case", list(UNLIKELY))
def test_unlikely_inputs_are_one_line_errors(scratch: Path, case: str) -> None:
    """json's recursion and integer-digit limits, csv's field limit, re's repeat and nesting
    limits, and a regular expression whose error message quotes a control character."""
    name, body = UNLIKELY[case]
    folder = _fill(scratch, {name: body, "direction.safetensors": _TENSOR})
    read: dict[str, Callable[[], object]] = {
        "direction.json": lambda: Direction.load(folder),
        "layout.json": lambda: LayoutSpec.from_fields(read_layout(folder / name)),
        "metrics.json": lambda: MetricsRecord.read(folder),
        "config.json": lambda: ConfigRecord.read(folder),
    }
    with pytest.raises(RefdirError) as caught:
        read.get(name, lambda: load_prompts(folder / name))()
    assert str(caught.value).splitlines() == [str(caught.value)]
