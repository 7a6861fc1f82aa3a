"""One exception type for user-facing problems: a one-line message that names the fix.

Messages speak Python: an option is named as the keyword or field it is in Python, in
backticks (`refusal_tokens`, `force='select'`); the command line shows those as its flags
(``--refusal-tokens``, ``--force select``).
"""

from __future__ import annotations

__all__ = ["RefdirError", "one_line"]


class RefdirError(Exception):
    """A problem with the user's input or setup; the CLI prints it as one line."""


def one_line(text: str) -> str:
    """``text`` (a library's message, a value read from a file) fit into a one-line message:
    each character that is not printable (a line break, a control character) as its escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
