"""Step ``monitor`` (only with ``suffix``): the refusal direction as a monitor of harmful
prompts, against a logistic probe, plain and under the suffix step's adversarial and random
suffixes (``evaluation/monitor_study.py``), into ``suffix/monitor.json``."""

from __future__ import annotations

from refdir.artifacts.run import CANDIDATES, DIRECTION_TENSOR, PromptSets
from refdir.artifacts.suffix import SuffixRecord
from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.evaluation.monitor_study import PromptPair, monitor_study
from refdir.study.files import SUFFIX_FOLDER
from refdir.study.state import Run
from refdir.study.steps.shared import eval_prompts

__all__ = ["step_monitor"]


def step_monitor(run: Run) -> None:
    c = run.config
    folder = run.out / SUFFIX_FOLDER
    found = SuffixRecord.read(folder)
    sets = PromptSets.read(run.out)
    cands = Candidates.load(run.out / CANDIDATES.FILE, CANDIDATES.fix())
    train = PromptPair(
        cands.harmful_prompts or sets.harmful_train,
        cands.harmless_prompts or sets.harmless_train,
        c.harmful_train,
        c.harmless_train,
    )
    val = PromptPair(sets.harmful_val, sets.harmless_val, c.harmful_val, c.harmless_val)
    _, harmful, harmless = eval_prompts(c)
    searched_on = set(found.instructions)
    test = PromptPair(
        [p for p in harmful if p not in searched_on],
        harmless,
        "+".join(c.harmful_eval),
        c.harmless_eval,
    )
    record = monitor_study(
        run.cm,
        Direction.load(run.out, DIRECTION_TENSOR.fix()),
        train,
        test,
        val=val,
        suffixes={"adversarial": found.suffix, "random": found.random_suffix},
        seed=c.seed,
        batch_size=c.batch_size,
        progress=run.progress,
    )
    record.write(folder)
