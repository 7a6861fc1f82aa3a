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


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("p.json", b'["ok", "a \\ud800 b"]', r"prompt 2 \(index 1\) is not valid Unicode text"),
        ("p.json", b'[{"prompt": "\\udfff"}]', r"prompt 1 \(index 0\) is not valid Unicode"),
        ("p.jsonl", b'"ok"\n\n{"goal": "a \\udc00"}\n', "line 3 is not valid Unicode text"),
        ("p.csv", b"prompt\nok\na \xed\xa0\x80 b\n", r"line 3 is not UTF-8 text \(byte 0xed\)"),
        ("p.txt", b"ok\n\na \xff b\n", r"line 3 is not UTF-8 text \(byte 0xff\)"),
        ("bom.txt", b"\xef\xbb\xbfok\n\xc3\n", "line 2 is not UTF-8 text"),
    ],
)
def test_a_prompt_that_is_not_unicode_text_is_refused_in_one_line(
    tmp_path: Path, name: str, body: bytes, message: str
) -> None:
    """A lone surrogate (valid JSON, but no tokenizer encodes it) or bytes that are not UTF-8:
    one line naming the file and the prompt, not a traceback from the tokenizer."""
    (tmp_path / name).write_bytes(body)
    with pytest.raises(RefdirError, match=message) as caught:
        load_prompts(tmp_path / name)
    assert str(caught.value).startswith(str(tmp_path / name)) and "\n" not in str(caught.value)
    with pytest.raises(RefdirError, match=message):
        sample_prompts(tmp_path / name, 1)


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("p.json", '["ok", ""]', r"prompt 2 \(index 1\) is empty"),
        (
            "p.json",
            '["ok", {"instruction": " \\t\\n "}]',
            r"prompt 2 \(index 1\) is only whitespace",
        ),
        ("p.jsonl", '"ok"\n{"prompt": ""}\n', "line 2 is empty"),
        ("p.csv", 'prompt,n\nok,1\n"   ",2\n', "line 3 is only whitespace"),
        ("p.csv", "n,prompt\n1,ok\n2\n", "line 3 is empty"),  # a short row
    ],
)
def test_empty_prompts_are_refused_in_one_line(
    tmp_path: Path, name: str, body: str, message: str
) -> None:
    (tmp_path / name).write_text(body)
    with pytest.raises(RefdirError, match=message) as caught:
        load_prompts(tmp_path / name)
    assert str(caught.value).startswith(str(tmp_path / name)) and "\n" not in str(caught.value)


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
