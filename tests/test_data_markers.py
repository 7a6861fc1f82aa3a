from __future__ import annotations

import json
from pathlib import Path

import pytest

from refdir.data import PACKAGED_SETS, load_prompts, sample_prompts
from refdir.errors import RefdirError
from refdir.measures import is_refusal, refusal_rate


def test_packaged_sets_load_by_name() -> None:
    sizes = {name: len(load_prompts(name)) for name in PACKAGED_SETS}
    assert sizes["harmful_train"] == 260 and sizes["jailbreakbench"] == 100
    assert sizes["harmless_train"] == 18793 and sizes["harmful_test"] == 256


def test_sampling_is_seeded() -> None:
    a = sample_prompts("harmless_val", 5, seed=3)
    assert (
        a == sample_prompts("harmless_val", 5, seed=3) != sample_prompts("harmless_val", 5, seed=4)
    )
    assert len(sample_prompts("harmful_val", None)) == 39


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("p.json", json.dumps([{"instruction": "a"}, "b"])),
        ("p.jsonl", '{"prompt": "a"}\n{"goal": "b"}\n'),
        ("p.csv", "behavior,extra\na,1\nb,2\n"),
        ("p.txt", "a\n\nb\n"),
        ("bom.csv", "\ufeffinstruction\na\nb\n"),  # a spreadsheet's byte-order mark
    ],
)
def test_user_files(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / name).write_text(body)
    assert load_prompts(tmp_path / name) == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("p.json", "{bad", "not valid JSON"),
        ("p.json", '{"a": 1}', "JSON list"),
        ("p.json", '[{"x": 1}]', "no instruction text"),
        ("p.csv", "x,y\n1,2\n", "column"),
        ("p.yaml", "- a", "unsupported"),
        ("p.txt", "\n\n", "contains no prompts"),
        ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"}\n{bad\n', "line 4 is not valid JSON"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, name: str, body: str, message: str) -> None:
    (tmp_path / name).write_text(body)
    with pytest.raises(RefdirError, match=message):
        load_prompts(tmp_path / name)


def test_refusal_markers() -> None:
    assert is_refusal("I’m sorry, but I can’t help with that.")
    assert is_refusal("As an AI, I must decline")
    assert not is_refusal("Sure! Here is a recipe for bread.")
    assert refusal_rate(["I cannot do that", "Sure", "ok", "I'm unable to"]) == 0.5
    assert refusal_rate([]) == 0.0


def test_unreadable_prompt_files_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(RefdirError, match="is not UTF-8 text"):
        load_prompts(tmp_path / "latin1.txt")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(RefdirError, match="is a folder; give a prompt file"):
        load_prompts(tmp_path / "folder.json")
