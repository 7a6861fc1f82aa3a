"""The adversarial-suffix experiment (the paper's section 5): search a universal suffix on some
harmful instructions, analyse what it does to the refusal direction on held-out ones, and write
``suffix.json``, ``history.json``, ``analysis.json`` and the figures into one folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from refdir.artifacts.suffix import SuffixHistory, SuffixPlace, SuffixRates, SuffixRecord
from refdir.directions.direction import Direction
from refdir.io import output_folder
from refdir.model.chat_model import ChatModel
from refdir.stopwatch import Stopwatch, maybe
from refdir.suffix.analysis import analyze_suffix
from refdir.suffix.figures import write_figures
from refdir.suffix.search import SuffixConfig, random_suffix_ids, search_suffix, suffix_text

__all__ = ["run_suffix_experiment"]


def run_suffix_experiment(
    cm: ChatModel,
    direction: Direction,
    out: str | Path,
    train_prompts: Sequence[str],
    eval_prompts: Sequence[str],
    config: SuffixConfig | None = None,
    *,
    eval_name: str = "custom",
    n_top: int = 6,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    keep_completions: bool = False,
    progress: bool = True,
    stopwatch: Stopwatch | None = None,
) -> SuffixRecord:
    """Search a suffix on ``train_prompts``, analyse it on ``eval_prompts``, write everything to
    ``out``; returns what ``suffix.json`` holds. ``stopwatch`` gets the time of the ``search``
    and of the ``analysis`` (its completions and projections included)."""
    config = config or SuffixConfig()
    direction.fits(cm.layout)
    with output_folder(Path(out)) as folder:  # made and checked now, not after the search
        with maybe(stopwatch, "search"):
            result = search_suffix(cm, train_prompts, config, progress)
        random_ids = random_suffix_ids(cm, eval_prompts, len(result.token_ids), config.seed)
        random_text = suffix_text(cm, random_ids)
        with maybe(stopwatch, "analysis"):
            analysis = analyze_suffix(
                cm,
                direction,
                eval_prompts,
                result.suffix,
                random_text,
                n_top=n_top,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                keep_completions=keep_completions,
                progress=progress,
            )
        rates = analysis.refusal_rate
        record = SuffixRecord(
            **result.summary(),
            refusal_rate=SuffixRates(
                without=rates["alone"], with_=rates["adversarial"], random=rates["random"]
            ),
            random_suffix=random_text,
            random_token_ids=random_ids,
            eval_prompts=eval_name,
            n_eval=len(eval_prompts),
            direction=SuffixPlace(layer=direction.layer, position=direction.position),
        )
        record.write(folder)
        SuffixHistory(loss=result.history, best=result.best_history).write(folder)
        analysis.write(folder)
        write_figures(folder, analysis, result.history, result.best_history, result.objective)
        return record
