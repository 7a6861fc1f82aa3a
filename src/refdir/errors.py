"""One exception type for user-facing problems: a one-line message that names the fix."""

from __future__ import annotations


class RefdirError(Exception):
    """A problem with the user's input or setup; the CLI prints it as one line."""


def filtered_out(name: str) -> RefdirError:
    """The error for a prompt set that the paper's refusal-metric filter emptied."""
    return RefdirError(
        f"the refusal-metric filter removed every prompt of {name}; check the refusal tokens "
        "(--refusal-tokens), or keep every prompt with --no-filter (a model that refuses nothing "
        "has no refusal direction to find)"
    )
