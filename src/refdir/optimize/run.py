"""``refdir optimize``: from a run folder's candidates (made first when missing), search edits
on the refusals-versus-KL front, confirm the front by generation, pick and export a point.

Files written into the folder, beside the run's: ``optuna-journal.log`` (the study, unless
``--storage`` puts it elsewhere), ``pareto.json``, ``heldout.json``, ``optimize.md`` with
``figures/pareto.png``, ``front/`` (each front point's edit), ``best/`` (the chosen point's
checkpoint) and, when the cone is searched, ``cones/`` (each trained cone, reused by a later
command)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

from optuna.trial import FrozenTrial
from tqdm.auto import tqdm

from refdir.artifacts.export import ExportManifest
from refdir.artifacts.pareto import FrontPoint, HeldoutRecord, ParetoRecord
from refdir.artifacts.run import PromptSets, RefusalTokensRecord
from refdir.artifacts.selection import SelectionRecord
from refdir.data import load_corpus
from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.losses import ce_loss
from refdir.interventions.edit import Edit
from refdir.interventions.export import export_edit
from refdir.interventions.intervention import NONE, Intervention
from refdir.io import make_folder, write_bytes, write_text
from refdir.model.chat_model import ChatModel
from refdir.model.loading import load_model
from refdir.optimize.cone import ConeSource
from refdir.optimize.config import OptimizeConfig
from refdir.optimize.front import agreement, confirm, fill_next, pick, refine_next
from refdir.optimize.heldout import heldout
from refdir.optimize.scorer import Scores, TrialScorer
from refdir.optimize.search import (
    STUDY_NAME,
    Search,
    completed,
    front,
    open_study,
    run_trials,
    thin,
)
from refdir.optimize.sources import DirectionSources
from refdir.optimize.space import edit_of, paper_params, start_params
from refdir.optimize.tokens import SearchTokens, refusal_forms, study_tokens
from refdir.report.figures import png_bytes
from refdir.report.pareto import pareto_figure, pareto_markdown
from refdir.study.folder import locked
from refdir.study.run import run_pipeline

__all__ = ["BEST", "FRONT", "optimize"]

log = logging.getLogger(__name__)

BEST = "best"
FRONT = "front"
"""The edit of every front point (``front/NN/edit.safetensors``, NN its index in pareto.json)
and the paper's (``front/paper/``), to apply by hooks (``refdir evaluate --edit``)."""


def optimize(
    config: OptimizeConfig,
    out: str | Path,
    progress: bool = True,
    model: ChatModel | None = None,
) -> ParetoRecord:
    """Search, confirm, pick and export (see the module's doc); returns the front."""
    out = Path(out)
    if config.max_kl is not None and config.max_refusal is not None:
        raise RefdirError("give `max_kl` or `max_refusal`, not both")
    cm = model if model is not None else load_model(config)
    run_pipeline(config.run_config(), out, until="select", progress=progress, model=cm)
    with locked(out):
        return _optimize(config, out, cm, progress)


def _optimize(config: OptimizeConfig, out: Path, cm: ChatModel, progress: bool) -> ParetoRecord:
    selection = SelectionRecord.read(out)
    if selection.chosen is None:
        raise RefdirError(
            f"the run in {out} chose no direction ({selection.rule}); see its selection.json"
        )
    position, paper_layer = selection.chosen.position, selection.chosen.layer
    prompts = PromptSets.read(out)
    candidates = Candidates.load(out)
    sources = DirectionSources(
        candidates,
        position,
        cm,
        prompts.harmful_train[: config.n_subspace],
        config.batch_size,
    )
    search = Search(cm.name, config.methods, position, cm.n_layers, paper_layer)
    study, storage = open_study(search, out, config.storage, config.seed)
    run_tokens = RefusalTokensRecord.read(out).ids

    def forms() -> SearchTokens:
        partial = start_params(paper_layer, ("weights",), cm.n_layers)[1:]
        edits = [edit_of(params, sources) for params in partial]
        return refusal_forms(
            cm, prompts.harmful_train, run_tokens, edits, config.gen_batch_size, progress
        )

    fixed = config.refusal_tokens is not None  # the user's tokens are scored as they are
    tokens = study_tokens(study, run_tokens, None if fixed else forms)
    if "cone" in config.methods:
        sources.cone = ConeSource(
            cm,
            lambda k: sources.basis(float(paper_layer), False, k),
            prompts.harmful_train,
            prompts.harmless_train,
            tokens,
            steps=config.cone_steps,
            kl_weight=config.cone_kl_weight,
            seed=config.seed,
            progress=progress,
            folder=out,
        )
    harmful = selection.validation.prompts.harmful_val
    scorer = TrialScorer(
        cm,
        harmful,
        selection.validation.prompts.harmless_val,
        tokens,
        config.batch_size,
    )
    seconds = run_trials(
        study, search, scorer, sources, config.trials, config.max_minutes, progress
    )
    texts = load_corpus(n=config.n_ce)

    def measured(edit: Edit, scores: Scores, trial: int | None, label: str) -> FrontPoint:
        return confirm(
            cm,
            edit,
            scores,
            trial,
            label,
            harmful,
            texts,
            config.max_new_tokens,
            config.gen_batch_size,
        )

    paper_edit = edit_of(paper_params(paper_layer, config.methods, cm.n_layers), sources)
    paper = measured(paper_edit, scorer.score(paper_edit), None, "paper")
    whole = front(study)
    trials = thin(whole, config.n_front)
    if not trials:
        raise RefdirError("no trial completed; run more trials (`trials`, `max_minutes`)")
    shutil.rmtree(out / FRONT, ignore_errors=True)  # an earlier command's front
    paper_edit.save(out / FRONT / "paper")
    confirmed: dict[int, tuple[FrontPoint, Edit]] = {}

    def confirm_trial(trial: FrozenTrial) -> None:
        edit = edit_of(dict(trial.params), sources)
        first = trial.user_attrs.get("refusal_first_token")
        scores = (
            Scores(trial.values[0], float(first), trial.values[1])
            if isinstance(first, float | int)
            else scorer.score(edit)  # a trial recorded without it
        )
        confirmed[trial.number] = (
            measured(edit, scores, trial.number, f"trial {trial.number}"),
            edit,
        )

    for trial in tqdm(trials, desc="confirm the front", disable=not progress, unit="point"):
        confirm_trial(trial)
    by_number = {t.number: t for t in whole}
    spots = [(t.number, t.values[1]) for t in whole]
    step = 1.5 / len(harmful)  # more than one prompt apart
    more: list[tuple[str, Callable[[dict[int, FrontPoint]], int | None]]] = [
        ("for the pick rule", lambda c: refine_next(spots, c, config.max_kl, config.max_refusal)),
        ("where the refusal rate falls", lambda c: fill_next(spots, c, step)),
    ]
    for why, next_trial in more:
        for _ in range(config.n_front):  # each needs far fewer; a bound all the same
            number = next_trial({n: point for n, (point, _) in confirmed.items()})
            if number is None:
                break
            log.info("confirming trial %d as well, %s", number, why)
            confirm_trial(by_number[number])
    ordered = sorted(confirmed.values(), key=lambda pe: (pe[0].kl, pe[0].refusal_score))
    points = [point for point, _ in ordered]
    edits = [edit for _, edit in ordered]
    for i, edit in enumerate(edits):
        edit.save(out / FRONT / f"{i:02d}")
    chosen, rule = pick(points, config.max_kl, config.max_refusal)
    ce_base = round(ce_loss(cm, texts, progress=False), 5) if texts else None
    record = ParetoRecord(
        model=cm.name,
        methods=list(config.methods),
        storage=storage,
        study=STUDY_NAME,
        trials=len(completed(study)),
        search_seconds=round(sum(seconds), 2),
        trial_seconds=round(statistics.median(seconds), 3) if seconds else 0.0,
        position=position,
        refusal_tokens=[cm.tokenizer.decode([t]) for t in tokens],
        ce_baseline=ce_base,
        paper=paper,
        points=points,
        agreement=agreement(points),
        rule=rule,
        chosen=chosen,
    )
    record.write(out)
    best = edits[chosen]
    direction = _direction_of(candidates, best, position, paper_layer)
    held: HeldoutRecord | None = None
    if config.heldout:
        conditions = {
            "none": NONE,
            "paper": Intervention.ablation(Direction.load(out)),
            "chosen": Intervention.edited(best),
        }
        long = config.long_tokens if config.long_tokens > config.max_new_tokens else None
        held = heldout(cm, config.run_config(), conditions, direction, long, progress)
        held.write(out)
    make_folder(out / "figures")
    write_bytes(out / "figures" / "pareto.png", png_bytes(pareto_figure(record)))
    write_text(out / "optimize.md", pareto_markdown(record, held, "figures/pareto.png"))
    if config.export:
        target = out / BEST
        if (target / ExportManifest.FILE).exists():  # an earlier pick of this folder
            shutil.rmtree(target)
        export_edit(cm, best, direction, target)  # edits cm in place: the last step
    return record


def _direction_of(candidates: Candidates, edit: Edit, position: int, paper_layer: int) -> Direction:
    """The edit's direction as a :class:`Direction` (for activation addition): its first basis
    vector at the scale of the candidate at the nearest layer, recorded at that layer (one
    below the last, where an addition can go). A cone's layer is the paper's, where it starts
    from (its ``index`` is not used by the edit). The vector points the way the candidate
    does (a basis vector's sign is free)."""
    index = float(paper_layer if edit.params.get("cone") else edit.params.get("index", 0.0))
    layer = min(round(index), candidates.n_layers - 1)
    nearest = candidates.direction(position, layer)
    unit = edit.basis[0].double()
    if float(unit @ nearest.vector.double()) < 0:  # a subspace's sign is free: point it to refuse
        unit = -unit
    vector = unit * nearest.norm
    return dataclasses.replace(
        nearest,
        vector=vector.float(),
        metadata={"source": "refdir optimize", "index": index},
    )
