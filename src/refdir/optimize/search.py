"""The multi-objective search, in Optuna's own storage: a study in the output folder (a journal
file) or at ``--storage URL``, which several workers on several machines can share and which a
later command extends. Trials minimise the two objectives of :mod:`.scorer`; the starting edits
of :func:`~.space.start_params` (the paper's, at partial strengths, with the cone) are the first
trials of a study (queued for any of them it does not hold yet)."""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from refdir.errors import RefdirError
from refdir.optimize.scorer import TrialScorer
from refdir.optimize.sources import DirectionSources
from refdir.optimize.space import edit_of, start_params, suggest

__all__ = [
    "JOURNAL_FILE",
    "STUDY_NAME",
    "Search",
    "completed",
    "front",
    "open_study",
    "run_trials",
    "study_storage",
    "thin",
]

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna-journal.log"
STUDY_NAME = "refdir-optimize"
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class Search:
    """What a study searches: stored in it, and checked when a command joins it."""

    model: str
    methods: tuple[str, ...]
    position: int
    n_layers: int
    paper_layer: int

    def attrs(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "methods": list(self.methods),
            "position": self.position,
            "n_layers": self.n_layers,
            "paper_layer": self.paper_layer,
        }


def study_storage(storage: str | None, folder: Path) -> tuple[Any, str]:
    """The storage object and how to name it: ``storage`` (a URL, or a journal file's path),
    else the journal file in ``folder``."""
    if storage is None:
        path = folder / JOURNAL_FILE
        return JournalStorage(JournalFileBackend(str(path))), str(path)
    if "://" in storage:
        return storage, storage
    return JournalStorage(JournalFileBackend(storage)), storage


RANDOM_TRIALS = 24
"""Trials drawn at random after the starting ones, before the sampler models the study. The
starts are queued trials, which the sampler counts as its random start: without these, its
model would begin from the starts alone, where every switch (``projected``, ``norm``,
``layers``, ``cone``) but one is off, and rarely turn one on."""


def open_study(
    search: Search, folder: Path, storage: str | None, seed: int
) -> tuple[optuna.Study, str]:
    """The study (made, or joined), and the storage's name. A study that searches something
    else (another model, methods or position) is refused. The sampler's seed is ``seed`` plus
    the trials the study already holds, plus the process id when ``storage`` is shared (so
    that workers started together do not draw the same trials)."""
    backend, name = study_storage(storage, folder)
    try:
        study = optuna.create_study(
            storage=backend,
            study_name=STUDY_NAME,
            directions=["minimize", "minimize"],
            load_if_exists=True,
        )
    except Exception as exc:  # optuna and its storages raise errors of their own
        raise RefdirError(f"cannot open the Optuna study at {name}: {exc}") from None
    attrs = search.attrs()
    held = study.user_attrs
    if not held:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
    elif {k: held.get(k) for k in attrs} != attrs:
        other = ", ".join(f"{k}={held.get(k)!r}" for k in attrs if held.get(k) != attrs[k])
        raise RefdirError(
            f"the study at {name} searches something else ({other}); give another `out` folder "
            "or `storage`"
        )
    starts = start_params(search.paper_layer, search.methods, search.n_layers)
    for params in starts:
        study.enqueue_trial(params, skip_if_exists=True)
    salt = len(study.trials) + (os.getpid() if storage is not None else 0)
    study.sampler = optuna.samplers.TPESampler(
        n_startup_trials=len(starts) + RANDOM_TRIALS,
        seed=(seed + salt) % 2**32,
        multivariate=True,
    )
    return study, name


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def run_trials(
    study: optuna.Study,
    search: Search,
    scorer: TrialScorer,
    sources: DirectionSources,
    trials: int,
    max_minutes: float = 0.0,
    progress: bool = True,
) -> list[float]:
    """Run trials until the study holds ``trials`` completed ones (counting other workers'),
    or ``max_minutes`` pass; return the wall time of each trial run here."""
    done = len(completed(study))
    if done >= trials:
        log.info("the study holds %d completed trials already; none to add", done)
        return []
    seconds: list[float] = []
    bar = tqdm(total=trials, initial=done, desc="trials", disable=not progress, unit="trial")

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        start = time.perf_counter()
        params = suggest(trial, search.methods, search.n_layers, sources.first_layer)
        scores = scorer.score(edit_of(params, sources))
        trial.set_user_attr("refusal_first_token", scores.refusal_first_token)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        seconds.append(time.perf_counter() - start)
        return scores.refusal_score, scores.kl

    def tick(study: optuna.Study, trial: FrozenTrial) -> None:
        bar.n = len(completed(study))
        bar.refresh()

    try:
        study.optimize(
            objective,
            n_trials=trials - done,
            timeout=max_minutes * 60 if max_minutes > 0 else None,
            catch=(RefdirError,),
            callbacks=[MaxTrialsCallback(trials, states=(TrialState.COMPLETE,)), tick],
        )
    finally:
        bar.close()
    if seconds:
        log.info(
            "%d trials in %.0f s (median %.2f s)",
            len(seconds),
            sum(seconds),
            statistics.median(seconds),
        )
    return seconds


def front(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto-optimal completed trials, by increasing KL (one per distinct point)."""
    best = sorted(study.best_trials, key=lambda t: (t.values[1], t.values[0], t.number))
    seen: set[tuple[float, ...]] = set()
    out = []
    for trial in best:
        key = tuple(trial.values)
        if key not in seen:
            seen.add(key)
            out.append(trial)
    return out


def thin(points: Sequence[FrozenTrial], at_most: int) -> list[FrozenTrial]:
    """At most ``at_most`` of ``points``, spread evenly along them (both ends kept)."""
    if len(points) <= at_most:
        return list(points)
    if at_most == 1:
        return [points[0]]
    step = (len(points) - 1) / (at_most - 1)
    return [points[round(i * step)] for i in range(at_most)]
