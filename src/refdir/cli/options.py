"""Command-line options built from the config models, so that an option is declared once.

:func:`with_options` gives a command one option per field of a pydantic model
(:class:`~refdir.model.options.ModelOptions`, :class:`~refdir.study.config.RunConfig`): the
field's default, its description as the help, and its :class:`~refdir.flags.Flag` for the
rest. The command receives the model, built from the options given on the command line (and,
for ``refdir run``, a TOML file under them); a rejected value is a one-line error naming the
flag. :func:`flags_in` turns the option names that library errors cite into flags.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from refdir.errors import RefdirError
from refdir.flags import Flag
from refdir.model.layout_spec import read_layout

__all__ = ["FLAGS", "flag_of", "flags_in", "option_error", "register", "with_options"]

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])

FLAGS: dict[str, str] = {}
"""Every option name that some command has -> its flag (``refusal_tokens`` ->
``--refusal-tokens``), filled as the commands are built."""

_BOOL_FLAGS: set[str] = set()


def flag_of(name: str, field: FieldInfo) -> Flag:
    """The field's :class:`Flag` (the default one when it has none)."""
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _base(annotation: Any) -> tuple[Any, bool]:
    """The type under ``X | None`` and whether None was allowed."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(get_args(annotation))
    return annotation, False


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    return text + ("." if text and not text.endswith(".") else "")


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    """The command-line parameter of one field; its default is the field's (shown in --help)."""
    flag = flag_of(name, field)
    base, optional = _base(field.annotation)
    names = [flag.flag(name)]
    default: Any = field.default
    help_text = _help(field)
    if flag.from_file is not None:
        kind: Any = Path | None
        default = None
        help_text = f"A {'JSON' if flag.from_file == 'json' else 'text'} file: {help_text}"
    elif flag.items:
        kind = str
        default = ",".join(str(v) for v in default) if default else (flag.empty or "")
        if optional and field.default is None:
            kind, default = str | None, None
    elif base is bool:
        kind = bool
        names = [f"{names[0]}/--no-{names[0][2:]}" if flag.negative else names[0]]
        _BOOL_FLAGS.add(name)
    elif flag.zero_is_none:
        kind, default = int, 0 if default is None else default
    else:
        kind = base | None if optional else base
    if flag.short:
        names.append(flag.short)
    option = typer.Option(*names, help=help_text, rich_help_panel=flag.panel)
    FLAGS[name] = flag.flag(name)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


def _file_value(path: Path, kind: str, flag: str) -> Any:
    if kind == "json":
        return read_layout(path)
    if path.is_dir():
        raise RefdirError(f"{flag} {path} is a folder; give a file")
    if not path.is_file():
        raise RefdirError(f"{flag} {path} does not exist; give a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RefdirError(f"{flag} {path} is not readable text ({exc})") from None


def _value(name: str, field: FieldInfo, raw: Any) -> Any:
    """The field's value from its command-line text."""
    flag = flag_of(name, field)
    if flag.from_file is not None:
        return None if raw is None else _file_value(Path(raw), flag.from_file, flag.flag(name))
    if flag.items:
        if raw is None:
            return None
        if flag.empty is not None and raw.strip().lower() == flag.empty:
            return ()
        if flag.empty is not None and not raw.strip():  # nothing, where a word says "none"
            return raw
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    return raw


def option_error(exc: ValidationError, model: type[BaseModel]) -> RefdirError:
    """The first problem of a rejected model as a one-line error naming the flag."""
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a check across options names its options itself
        return RefdirError(flags_in(message))
    name = str(error["loc"][0])
    field = model.model_fields.get(name)
    flag = flag_of(name, field).flag(name) if field is not None else f"--{name.replace('_', '-')}"
    return RefdirError(f"{flag}: {message[0].lower()}{message[1:]}")


def with_options(
    model: type[M], base: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per field of ``model``; it receives ``options``, a ``model``
    made of the options given on the command line over ``base(own)`` (``own``: the command's
    other options; ``refdir run`` reads a TOML file there) over the fields' defaults."""
    fields = model.model_fields

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "options"]
        derived = [_parameter(name, field) for name, field in fields.items()]
        hints = typing.get_type_hints(fn, include_extras=True)

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            context: typer.Context = kwargs.pop(_CONTEXT)
            given = {
                name: _value(name, fields[name], kwargs.pop(name))
                for name in list(kwargs)
                if name in fields
            }
            explicit = {name: value for name, value in given.items() if _given(context, name)}
            values = {**(base(kwargs) if base is not None else {}), **explicit}
            try:
                options = model(**values)
            except ValidationError as exc:
                raise option_error(exc, model) from None
            return fn(options=options, **kwargs)

        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name]) for p in own
        ]
        context = inspect.Parameter(
            _CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
        )
        params = [*own, *derived, context]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


_CONTEXT = "refdir_context"
"""The parameter typer hands the command's context in (not an option)."""


def _given(context: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given (on the command line or in the environment), not
    left at its default."""
    source = context.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


_CITED = re.compile(r"`([a-z_]+)(?:=(?:'([^`']*)'|([^`]*)))?`")


def flags_in(message: str) -> str:
    """``message`` with the options it cites in Python terms (`name`, `name=value`) written as
    the command line's flags (``--name``, ``--name value``); other code is left as it is."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2) or match.group(3)
        if name not in FLAGS:
            return match.group(0)
        if value is None:
            return FLAGS[name]
        if name in _BOOL_FLAGS and value in ("True", "False"):
            return FLAGS[name] if value == "True" else f"--no-{FLAGS[name][2:]}"
        return f"{FLAGS[name]} {value}"

    return _CITED.sub(flag, message)


def register(name: str, flag: str, boolean: bool = False) -> None:
    """A command's own option (not a config field) that library errors may cite (``boolean``:
    a switch, cited as ``--flag`` for ``name=True``)."""
    FLAGS.setdefault(name, flag)
    if boolean:
        _BOOL_FLAGS.add(name)
