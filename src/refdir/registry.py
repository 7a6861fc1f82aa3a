"""A small registry of named, pluggable parts (judges, scorers), after lm-evaluation-harness's
``lm_eval/api/registry.py``: a duplicate name is an error, and an unknown name suggests the
closest registered ones.

    JUDGES: Registry[JudgeFactory] = Registry("judge")

    @JUDGES.register("llamaguard")
    def llamaguard(...) -> Judge: ...

    JUDGES.get("lamaguard")  # RefdirError: unknown judge 'lamaguard'; did you mean 'llamaguard'?
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from refdir.errors import RefdirError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one kind by name; names are unique and looked up exactly."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``; a name already taken is an error."""
        if not isinstance(name, str) or not name.strip():
            raise RefdirError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._items:
            raise RefdirError(f"{self.kind} {name!r} is already registered; pick another name")
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorate(obj: T) -> T:
            return self.add(name, obj)

        return decorate

    def get(self, name: str) -> T:
        """The object registered as ``name``; a typo gets the closest names suggested."""
        try:
            return self._items[name]
        except KeyError:
            raise RefdirError(self._unknown(name)) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def _unknown(self, name: str) -> str:
        known = ", ".join(self.names()) or "none registered"
        close = difflib.get_close_matches(str(name), self.names(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {known})"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
