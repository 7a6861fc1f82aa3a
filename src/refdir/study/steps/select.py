"""Step ``select``: the paper's scores of every candidate on the validation prompts that pass
its filter, then its filters and pick (or a candidate chosen by hand). The scores are kept in
``selection.json``, so another pick by hand reuses them."""

from __future__ import annotations

import logging
import math

import torch

from refdir.artifacts.run import CANDIDATES, PromptSets, RefusalTokensRecord
from refdir.artifacts.selection import (
    Baseline,
    Chosen,
    Filters,
    SelectionRecord,
    Validation,
    ValidationCounts,
    ValidationPrompts,
)
from refdir.directions.candidates import Candidates
from refdir.directions.scoring import ValidationSets, score_candidates
from refdir.directions.selection import CandidateScores, Selection, SelectionConfig, passing, pick
from refdir.errors import RefdirError
from refdir.study.config import RunConfig
from refdir.study.state import Run

__all__ = ["selection_config", "step_select"]

log = logging.getLogger(__name__)


def selection_config(c: RunConfig) -> SelectionConfig:
    """The paper's filters and fallback as the run's options set them."""
    return SelectionConfig(
        c.kl_max,
        c.induce_min,
        c.max_layer_fraction,
        c.fallback_kl_bounds,
        layer_rule=c.layer_rule,
        epsilons=c.epsilons,
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _grid(t: torch.Tensor) -> list[list[float | None]]:
    return [[None if v != v else round(float(v), 6) for v in row] for row in t.tolist()]


def _tensor(rows: list[list[float | None]]) -> torch.Tensor:
    return torch.tensor(
        [[math.nan if v is None else v for v in row] for row in rows], dtype=torch.float64
    )


def _record(
    scores: CandidateScores,
    chosen: Selection | None,
    config: SelectionConfig,
    rule: str,
    picked: Chosen | None,
    validation: Validation,
) -> SelectionRecord:
    passed, n_candidates = passing(scores, config)  # a hand pick or none: the filter's view
    # a hand pick is no fallback; a selection that picked nothing records null
    fallback = chosen.fallback if chosen is not None else (False if picked is not None else None)
    return SelectionRecord(
        positions=scores.positions,
        layers=scores.layers,
        bypass=_grid(scores.bypass),
        induce=_grid(scores.induce),
        kl=_grid(scores.kl),
        baseline=Baseline(
            harmful_val=scores.baseline_harmful, harmless_val=scores.baseline_harmless
        ),
        filters=Filters(
            kl_max=config.kl_max,
            induce_min=config.induce_min,
            max_layer_fraction=config.max_layer_fraction,
            layer_rule=config.layer_rule if config.layer_rule != "fraction" else None,
            epsilons=config.epsilons or None,
            fallback_kl_bounds=list(config.fallback_kl_bounds),
        ),
        rule=rule,
        passed=passed.tolist(),
        fallback=fallback,
        n_candidates=n_candidates,
        n_passed=int(passed.sum()),
        chosen=picked,
        validation=validation,
    )


def _scores(
    run: Run, cands: Candidates, config: SelectionConfig
) -> tuple[CandidateScores, Validation]:
    """Scores and the validation prompts kept by the filter (with counts), from an earlier
    attempt's selection.json (same run), else computed now."""
    c, out = run.config, run.out
    if (out / SelectionRecord.FILE).exists():
        earlier = SelectionRecord.read(out)
        log.info("reusing candidate scores from %s", out / SelectionRecord.FILE)
        scores = CandidateScores(
            earlier.positions,
            earlier.layers,
            _tensor(earlier.bypass),
            _tensor(earlier.induce),
            _tensor(earlier.kl),
            earlier.baseline.harmful_val,
            earlier.baseline.harmless_val,
        )
        return scores, earlier.validation
    prompts = PromptSets.read(out)
    tokens = RefusalTokensRecord.read(out).ids
    cm = run.cm  # loading the model is not a part
    # the paper's filter, in the passes that also give selection its baseline
    with run.watch.part("baselines"):
        val = ValidationSets.build(
            cm, prompts.harmful_val, prompts.harmless_val, tokens, c.filter_prompts, c.batch_size
        )
    counts = val.counts()
    kept = Validation(
        prompts=ValidationPrompts(harmful_val=val.harmful, harmless_val=val.harmless),
        filter=ValidationCounts.model_validate(counts),
    )
    # pruning skips the layers past the layer filter; score_all scores every layer
    scores = score_candidates(
        cm,
        cands,
        val.harmful,
        val.harmless,
        tokens,
        config,
        None,
        c.batch_size,
        run.progress,
        prune=not c.score_all,
        validation=val,
        stopwatch=run.watch,
    )
    return scores, kept


def _choose(
    c: RunConfig, scores: CandidateScores, config: SelectionConfig
) -> tuple[Selection | None, str, int, int]:
    if c.layer is None or c.position is None:
        chosen = pick(scores, config)
        return chosen, chosen.rule, chosen.layer, chosen.position
    if c.position not in scores.positions or not 0 <= c.layer < len(scores.layers):
        raise RefdirError(
            f"`position` must be one of {scores.positions} and `layer` in "
            f"0..{len(scores.layers) - 1}"
        )
    return None, f"manual: layer {c.layer}, position {c.position}", c.layer, c.position


def step_select(run: Run) -> None:
    out, config = run.out, selection_config(run.config)
    cands = Candidates.load(out / CANDIDATES.FILE, CANDIDATES.fix())
    scores, validation = _scores(run, cands, config)
    try:
        chosen, rule, layer, position = _choose(run.config, scores, config)
    except RefdirError as exc:
        _record(scores, None, config, f"none: {exc}", None, validation).write(out)
        raise
    p = scores.positions.index(position)
    # a hand pick may be a candidate the pruned scoring left out: its scores are unknown
    picked = {k: _finite(float(getattr(scores, k)[p, layer])) for k in ("bypass", "induce", "kl")}
    chosen_cell = Chosen(position=position, layer=layer, **picked)
    record = _record(scores, chosen, config, rule, chosen_cell, validation)
    cands.direction(position, layer, rule=rule, **picked).save(out)
    record.write(out)
