"""The data refdir ships: the paper's prompt sets (instructions only, see PROVENANCE.md and
LICENSES.md here) and a plain-text corpus for the cross-entropy loss, and the readers of the
user's own prompt files."""

from refdir.data.corpora import CORPORA, load_corpus
from refdir.data.prompts import PACKAGED_SETS, held_out_prompts, load_prompts, sample_prompts

__all__ = [
    "CORPORA",
    "PACKAGED_SETS",
    "held_out_prompts",
    "load_corpus",
    "load_prompts",
    "sample_prompts",
]
