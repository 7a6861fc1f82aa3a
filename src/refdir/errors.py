"""One exception type for user-facing problems: a one-line message that names the fix."""

from __future__ import annotations


class RefdirError(Exception):
    """A problem with the user's input or setup; the CLI prints it as one line."""
