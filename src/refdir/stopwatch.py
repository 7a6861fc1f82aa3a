"""Wall time of the parts of a step, so that every run says where its time goes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Stopwatch", "maybe"]


class Stopwatch:
    """Seconds per named part, summed over every time the part runs (the induce passes of all
    layers add up under one name). Parts may not nest: each second counts once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._running: str | None = None

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        if self._running is not None:
            raise RuntimeError(f"part {name!r} started inside part {self._running!r}")
        self._running = name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self._running = None

    def rounded(self) -> dict[str, float]:
        """The parts in the order they first ran, to 10 ms."""
        return {name: round(s, 2) for name, s in self.seconds.items()}


@contextmanager
def maybe(watch: Stopwatch | None, name: str) -> Iterator[None]:
    """``watch.part(name)``, or nothing without a stopwatch."""
    if watch is None:
        yield
    else:
        with watch.part(name):
            yield
