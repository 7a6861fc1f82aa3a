"""One exception type for user-facing problems: a one-line message that names the fix.

Messages speak Python: an option is named as the keyword or field it is in Python, in
backticks (`refusal_tokens`, `force='select'`); the command line shows those as its flags
(``--refusal-tokens``, ``--force select``).
"""

from __future__ import annotations

__all__ = ["RefdirError"]


class RefdirError(Exception):
    """A problem with the user's input or setup; the CLI prints it as one line."""
