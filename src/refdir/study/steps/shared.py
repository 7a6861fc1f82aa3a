"""What several steps read the same way: the held-out prompts, and the harmful training prompts
the difference of means is over."""

from __future__ import annotations

from refdir.artifacts.run import CANDIDATES, PromptSets
from refdir.data import sample_prompts, sample_stream
from refdir.directions.candidates import Candidates
from refdir.study.config import RunConfig
from refdir.study.state import Run

__all__ = ["EvalPrompts", "eval_prompts", "kept_harmful_train", "sampled_sets"]

EvalPrompts = tuple[dict[str, list[str]], list[str], list[str]]
"""The held-out harmful prompts per set, every harmful prompt once, the harmless prompts."""


def sampled_sets(c: RunConfig) -> list[list[str]]:
    """Every prompt set of a run as sampled, in the paper's order: harmful_train,
    harmless_train, harmful_val, harmless_val, the harmless evaluation set, then each harmful
    evaluation set. ``sampling="per-set"`` seeds each set's own generator with ``seed``;
    ``one-stream`` draws them in turn from one generator, as the paper's code does."""
    sets: list[tuple[str, int | None]] = [
        (c.harmful_train, c.n_train),
        (c.harmless_train, c.n_train),
        (c.harmful_val, c.n_val),
        (c.harmless_val, c.n_val),
        (c.harmless_eval, c.n_eval_harmless),
        *((name, c.n_eval_harmful) for name in c.harmful_eval),
    ]
    if c.sampling == "one-stream":
        return sample_stream(sets, c.seed)
    return [sample_prompts(name, n, c.seed) for name, n in sets]


def eval_prompts(c: RunConfig) -> EvalPrompts:
    drawn = sampled_sets(c)
    harmless = drawn[4]
    by_set = dict(zip(c.harmful_eval, drawn[5:], strict=True))
    harmful = list(dict.fromkeys(p for prompts in by_set.values() for p in prompts))
    return by_set, harmful, harmless


def kept_harmful_train(run: Run) -> list[str]:
    """The harmful training prompts the difference of means is over."""
    cands = Candidates.load(run.out / CANDIDATES.FILE, CANDIDATES.fix())
    return cands.harmful_prompts or PromptSets.read(run.out).harmful_train
