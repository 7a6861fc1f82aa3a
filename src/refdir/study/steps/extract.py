"""Step ``extract``: the difference-of-means candidates at every layer and post-instruction
position, over the training prompts that pass the paper's filter (in the same pass)."""

from __future__ import annotations

from refdir.artifacts.run import CANDIDATES, PromptSets, RefusalTokensRecord
from refdir.directions.extraction import extract_candidates
from refdir.study.state import Run

__all__ = ["step_extract"]


def step_extract(run: Run) -> None:
    prompts = PromptSets.read(run.out)
    c = run.config
    tokens = RefusalTokensRecord.read(run.out).ids if c.filter_prompts else None
    cands = extract_candidates(
        run.cm,
        prompts.harmful_train,
        prompts.harmless_train,
        c.batch_size,
        run.progress,
        c.harmful_train,
        c.harmless_train,
        refusal_tokens=tokens,  # the paper's filter, in the extraction pass
    )
    cands.save(run.out / CANDIDATES.FILE)
