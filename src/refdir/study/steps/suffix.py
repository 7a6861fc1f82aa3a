"""Step ``suffix`` (only with ``suffix``): search a universal adversarial suffix on refused
training prompts and analyse it on held-out ones (``suffix/``)."""

from __future__ import annotations

from refdir.artifacts.run import DIRECTION_TENSOR, RefusalTokensRecord
from refdir.directions.direction import Direction
from refdir.study.files import SUFFIX_FOLDER
from refdir.study.state import Run
from refdir.study.steps.shared import eval_prompts, kept_harmful_train
from refdir.suffix.experiment import run_suffix_experiment
from refdir.suffix.search import SuffixConfig

__all__ = ["step_suffix"]


def step_suffix(run: Run) -> None:
    c = run.config
    train = kept_harmful_train(run)[: c.n_suffix_prompts]
    held_out = [p for p in eval_prompts(c)[1] if p not in set(train)][: c.n_suffix_eval]
    tokens = RefusalTokensRecord.read(run.out).texts
    config = SuffixConfig(
        n_steps=c.suffix_steps,
        seed=c.seed,
        refusal_words=tuple(t.strip() or t for t in tokens),
        max_seconds=c.suffix_max_minutes * 60 if c.suffix_max_minutes > 0 else None,
    )
    run_suffix_experiment(
        run.cm,
        Direction.load(run.out, DIRECTION_TENSOR.fix()),
        run.out / SUFFIX_FOLDER,
        train,
        held_out,
        config,
        eval_name="+".join(c.harmful_eval),
        max_new_tokens=c.max_new_tokens,
        batch_size=c.batch_size,
        progress=run.progress,
        stopwatch=run.watch,
    )
