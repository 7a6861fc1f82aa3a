"""How an option of a config model appears on the command line.

The options of a run and of model loading are declared once, as fields of pydantic models
(:class:`refdir.study.config.RunConfig`, :class:`refdir.model.options.ModelOptions`), with
their defaults and descriptions. A :class:`Flag` in a field's ``Annotated`` metadata says
what the command line needs beyond that: the flag's name where it is not the field's, its
help panel, and how its text becomes the field's value. ``refdir.cli`` builds every option of
the commands from these, so a default or a description is never written twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Flag"]


@dataclass(frozen=True)
class Flag:
    """Command-line form of one config field."""

    name: str | None = None
    """The flag without its dashes; default: the field's name with dashes for underscores."""
    panel: str | None = None
    """The ``--help`` panel the option is listed under."""
    short: str | None = None
    """A one-letter alias, such as ``-m``."""
    items: bool = False
    """A tuple field given as comma-separated items (``--harmful-eval a,b``)."""
    empty: str | None = None
    """With ``items``: the word that gives an empty tuple (``--fallback-kl none``)."""
    zero_is_none: bool = False
    """An ``int | None`` field where 0 on the command line stands for None (all of them)."""
    from_file: Literal["text", "json"] | None = None
    """The option names a file whose text (or JSON object) is the field's value."""
    negative: bool = True
    """A boolean field gets ``--no-NAME`` too."""

    def flag(self, field: str) -> str:
        """The option's name on the command line, with its dashes."""
        return "--" + (self.name or field.replace("_", "-"))
