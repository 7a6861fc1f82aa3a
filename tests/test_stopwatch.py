from __future__ import annotations

import time

import pytest

from refdir.stopwatch import Stopwatch, maybe


def test_parts_add_up_over_repeats_and_do_not_nest() -> None:
    watch = Stopwatch()
    for _ in range(2):
        with watch.part("a"):
            time.sleep(0.02)
    with maybe(watch, "b"):
        pass
    with maybe(None, "c"):  # no stopwatch: nothing recorded
        pass
    assert list(watch.seconds) == ["a", "b"]
    assert 0.04 <= watch.seconds["a"] < 1.0
    assert watch.rounded()["b"] == 0.0
    inside = pytest.raises(RuntimeError, match="started inside part 'a'")
    with watch.part("a"), inside, watch.part("b"):
        pass
    assert watch.seconds["b"] == pytest.approx(0.0, abs=0.01)  # the refused part counted nothing
    with watch.part("d"):  # the failed nesting left the stopwatch usable
        pass
    assert "d" in watch.seconds
