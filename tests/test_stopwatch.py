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
    with watch.part("a"), inside, watch.part("nested"):
        pass
    assert "nested" not in watch.seconds  # the refused part counted nothing
    with pytest.raises(ValueError), watch.part("fails"):  # a part that raises still counts
        time.sleep(0.01)
        raise ValueError
    assert watch.seconds["fails"] >= 0.01
    with watch.part("d"):  # neither left the stopwatch unusable
        pass
    assert list(watch.seconds) == ["a", "b", "fails", "d"]
