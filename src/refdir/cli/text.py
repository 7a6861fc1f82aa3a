"""Text that the command line prints but did not write itself (prompts, completions, file and
model names), made safe for a terminal: a prompt file or a model's output cannot move the
cursor, clear the screen or set the window title."""

from __future__ import annotations

import re

__all__ = ["printable"]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Control characters but newline and tab: C0, DEL and C1 (0x80-0x9f, where 0x9b is a CSI)."""


def printable(text: str) -> str:
    """``text`` with each control character other than newline and tab as a visible escape
    (``\\x1b`` for ESC, ``\\x0d`` for a carriage return)."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
