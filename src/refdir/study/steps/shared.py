"""What several steps read the same way: the held-out prompts, and the harmful training prompts
the difference of means is over."""

from __future__ import annotations

from refdir.artifacts.run import CANDIDATES, PromptSets
from refdir.data import sample_prompts
from refdir.directions.candidates import Candidates
from refdir.study.config import RunConfig
from refdir.study.state import Run

__all__ = ["EvalPrompts", "eval_prompts", "kept_harmful_train"]

EvalPrompts = tuple[dict[str, list[str]], list[str], list[str]]
"""The held-out harmful prompts per set, every harmful prompt once, the harmless prompts."""


def eval_prompts(c: RunConfig) -> EvalPrompts:
    by_set = {name: sample_prompts(name, c.n_eval_harmful, c.seed) for name in c.harmful_eval}
    harmful = list(dict.fromkeys(p for prompts in by_set.values() for p in prompts))
    harmless = sample_prompts(c.harmless_eval, c.n_eval_harmless, c.seed)
    return by_set, harmful, harmless


def kept_harmful_train(run: Run) -> list[str]:
    """The harmful training prompts the difference of means is over."""
    cands = Candidates.load(run.out / CANDIDATES.FILE, CANDIDATES.fix())
    return cands.harmful_prompts or PromptSets.read(run.out).harmful_train
