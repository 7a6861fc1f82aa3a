"""The base of every typed file refdir writes: a pydantic model that knows its file name and
the ``refdir run`` step that writes it, reads itself with one-line errors and writes itself
through a temporary file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from refdir.errors import RefdirError
from refdir.io import write_text

__all__ = ["FORMAT_VERSION", "Artifact", "RunFile", "Strict", "read_json_object"]

FORMAT_VERSION = "0.2.0"
"""The refdir version whose files these models describe; files of 0.1.0 read as they are."""

A = TypeVar("A", bound="Artifact")


class Strict(BaseModel):
    """A part of a file: every key declared, nothing else accepted. ``OMIT``: optional keys
    left out when they are None (a key written only with some options)."""

    model_config = ConfigDict(extra="forbid")
    OMIT: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self.OMIT:
                if data.get(name, 0) is None:
                    del data[name]
        return data


class RunFile:
    """A file of a run folder that is not JSON (tensors, the report): its name and the step of
    ``refdir run`` that writes it."""

    def __init__(self, file: str, step: str) -> None:
        self.FILE, self.STEP = file, step

    def fix(self) -> str:
        """How to make the file again in its run folder."""
        return f"redo it with `force='{self.STEP}'` (or use a new `out` folder)"

    def __repr__(self) -> str:
        return f"RunFile({self.FILE!r}, {self.STEP!r})"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _key(part: str | int) -> str:
    """A key or index of a path into a file, quoted where it is empty or not printable (a
    line break in a key would break the one-line message)."""
    text = str(part)
    return text if text and text.isprintable() else repr(text)


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; a one-line error ending in ``fix`` when it is missing, is
    not JSON or is not an object."""
    if not path.is_file():
        raise RefdirError(f"{path} is missing; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RefdirError(f"{path} is damaged ({_first_line(exc)}); {fix}") from None
    except (ValueError, RecursionError) as exc:  # past json's limits
        why = "nested too deeply" if isinstance(exc, RecursionError) else "a number too long"
        raise RefdirError(f"{path} is damaged (JSON {why} to read); {fix}") from None
    if not isinstance(data, dict):
        raise RefdirError(f"{path} should hold a JSON object; {fix}")
    return data


class Artifact(Strict):
    """A typed JSON file. ``FILE``: its name (a path relative to the folder it is in);
    ``STEP``: the ``refdir run`` step that writes it (None for files written outside a run)."""

    FILE: ClassVar[str]
    STEP: ClassVar[str | None] = None
    SORT_KEYS: ClassVar[bool] = False

    @classmethod
    def fix(cls, folder: Path) -> str:
        """How to make the file again."""
        if cls.STEP is None:
            return "write it again"
        return f"redo it with `force='{cls.STEP}'` (or use a new `out` folder)"

    @classmethod
    def read(cls: type[A], folder: str | Path) -> A:
        """The file in ``folder``, validated; a one-line error naming the problem and the step
        that writes the file otherwise."""
        path = Path(folder) / cls.FILE
        return cls.parse(read_json_object(path, cls.fix(Path(folder))), path)

    @classmethod
    def parse(cls: type[A], data: dict[str, Any], path: Path) -> A:
        """``data`` read from ``path``, validated."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(_key(part) for part in error["loc"]) or "the file"
            message = str(error["msg"]).removeprefix("Value error, ")
            raise RefdirError(
                f"{path} is not a {cls.FILE} of refdir {FORMAT_VERSION} or 0.1.0 "
                f"({where}: {message}); {cls.fix(path.parent)}"
            ) from None

    def dump(self) -> dict[str, Any]:
        """The file's JSON value (optional keys that are None left out)."""
        return self.model_dump(mode="json")

    def text(self) -> str:
        return json.dumps(self.dump(), indent=2, sort_keys=self.SORT_KEYS) + "\n"

    def write(self, folder: str | Path) -> Path:
        """Write the file into ``folder`` through a temporary file; returns its path. A record
        that would not read back (JSON has no NaN or infinity: they are written as null, which
        a number field refuses) is a one-line error, and nothing is written."""
        path = Path(folder) / self.FILE
        text = self.text()
        try:
            type(self).model_validate(json.loads(text))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(_key(part) for part in error["loc"]) or "the record"
            raise RefdirError(
                f"{path} would not read back ({where} is {self._value_at(error['loc'])}, which "
                "JSON cannot hold); the numbers behind it are not finite: check the model's "
                "outputs (a float16 overflow?) or the inputs"
            ) from None
        write_text(path, text)
        return path

    def _value_at(self, loc: tuple[int | str, ...]) -> str:
        """The record's own value at a validation error's location, as Python shows it."""
        value: Any = self
        for part in loc:
            if isinstance(value, BaseModel):
                value = getattr(value, str(part), None)
            elif isinstance(value, dict | list | tuple):
                try:
                    value = value[part]  # type: ignore[index]
                except (KeyError, IndexError, TypeError):
                    return "not a finite number"
            else:
                break
        return repr(value)
