"""Every command-line case of docs/reliability.md, run: its exit code, its one line (word for
word as the table shows it), no traceback, and its folder left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability import CASES, FAULTS, TABLE, Bench, build_bench, documented, run_case


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    build_bench(root)
    return root


@pytest.fixture(scope="module")
def table() -> dict[str, tuple[int, str]]:
    return documented()


@pytest.mark.parametrize("key", list(CASES))
def test_case(
    key: str, bench_root: Path, table: dict[str, tuple[int, str]], tmp_path: Path
) -> None:
    case = CASES[key]
    outcome = run_case(case, Bench(bench_root, tmp_path))
    assert not outcome.traceback, outcome
    assert outcome.code == case.code, outcome
    assert len(outcome.errors) == 1 and case.expect in outcome.errors[0], outcome
    assert outcome.changed == [], f"the command changed {outcome.changed}"
    fix = f"{TABLE.name} is stale: python tests/reliability.py"
    assert key in table, fix
    assert table[key] == (case.code, outcome.errors[0]), fix


def test_the_table_lists_every_case_and_has_40_rows_at_least() -> None:
    text = TABLE.read_text()
    assert set(documented()) == set(CASES) or set(documented()) - {"no-gpu"} == set(CASES)
    rows = [line for line in text.splitlines() if line[:2] == "| " and line[2:3].isdigit()]
    assert len(rows) == len(CASES) + len(FAULTS) >= 40
    for fault in FAULTS.values():  # every fault's test exists
        module, _, name = fault.test.partition("::")
        source = (Path(__file__).parent / module).read_text()
        assert not name or f"def {name}(" in source, fault.test
