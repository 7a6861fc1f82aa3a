"""The data refdir ships: the paper's prompt sets (instructions only, see PROVENANCE.md and
LICENSES.md here) and a plain-text corpus for the cross-entropy loss, and the readers of the
user's own prompt files."""

from refdir.data.corpora import CORPORA, Corpus, load_corpus, read_corpus
from refdir.data.prompts import (
    PACKAGED_SETS,
    held_out_prompts,
    load_prompts,
    prompt_categories,
    sample_prompts,
    sample_stream,
)

__all__ = [
    "CORPORA",
    "PACKAGED_SETS",
    "Corpus",
    "held_out_prompts",
    "load_corpus",
    "load_prompts",
    "prompt_categories",
    "read_corpus",
    "sample_prompts",
    "sample_stream",
]
