"""The steps of ``refdir run`` as data, and what to redo computed from them.

:data:`STEPS` lists, for each step in the order they run: the function that runs it, the steps
whose files it reads, the options it reads and what a change of them does, the files it may
keep across a redo, and when it is part of a run. The files each step writes are declared with
the files (:mod:`refdir.study.files`). From that table:

* a step whose files are all there is done and skipped, so a killed run resumes;
* ``force=STEP`` redoes that step and every later one;
* an option read by a step whose results are the run's identity (``refuse``) cannot change in
  the same folder; any other changed option redoes the steps that read it (``redo``; with
  ``keep``, the step's kept files stay and are reused) and every step that reads their files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from refdir.artifacts.run import ConfigRecord, Numerics
from refdir.artifacts.selection import SelectionRecord
from refdir.errors import RefdirError
from refdir.io import write_text
from refdir.model.loading import ORGANISM
from refdir.study.config import CONFIG_TOML, RESULT_FREE, RunConfig, config_toml
from refdir.study.files import COMPLETIONS, written_by
from refdir.study.state import Run, versions
from refdir.study.steps.benchmarks import step_benchmarks
from refdir.study.steps.evaluate import step_evaluate
from refdir.study.steps.extract import step_extract
from refdir.study.steps.monitor import step_monitor
from refdir.study.steps.prompts import step_prompts
from refdir.study.steps.report import step_report
from refdir.study.steps.select import step_select
from refdir.study.steps.suffix import step_suffix

__all__ = [
    "STEPS",
    "STEP_NAMES",
    "Reads",
    "Step",
    "changed_options",
    "check_config",
    "check_step",
    "stale_steps",
    "step",
]

Effect = Literal["refuse", "redo", "keep"]


@dataclass(frozen=True)
class Reads:
    """Options a step reads, and what a change of them does to a folder that has the step's
    results: ``refuse`` (they are the run's identity: use another folder or redo the whole
    run), ``redo`` (the step and every step that reads its files are redone), ``keep`` (the
    same, but the step's kept files stay and are reused)."""

    options: frozenset[str]
    effect: Effect = "redo"


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Run], None]
    needs: tuple[str, ...] = ()
    """Steps whose files this one reads."""
    reads: tuple[Reads, ...] = ()
    keeps: tuple[str, ...] = ()
    """Files (or glob patterns) a ``keep`` redo leaves in place for the step to reuse."""
    enabled: Callable[[RunConfig], bool] = lambda c: True

    @property
    def writes(self) -> tuple[str, ...]:
        return written_by(self.name)

    def done(self, out: Path) -> bool:
        return all((out / name).exists() for name in self.writes)

    def remove(self, out: Path, keep: bool = False) -> None:
        """Delete the step's files (but the kept ones, with ``keep``)."""
        for name in self.writes:
            if not (keep and name in self.keeps):
                (out / name).unlink(missing_ok=True)
        if not keep:
            for pattern in self.keeps:
                for path in out.glob(pattern):
                    path.unlink()


MODEL = frozenset({"model", "gguf_file", "system", "chat_template", "template_kwargs", "layout"})

STEPS: tuple[Step, ...] = (
    Step(
        "prompts",
        step_prompts,
        reads=(
            Reads(
                MODEL
                | {
                    "seed",
                    "n_train",
                    "n_val",
                    "harmful_train",
                    "harmless_train",
                    "harmful_val",
                    "harmless_val",
                    "refusal_tokens",
                    "n_refusal_probe",
                    "sampling",
                    "family_refusal_tokens",
                },
                "refuse",
            ),
        ),
    ),
    Step(
        "extract",
        step_extract,
        needs=("prompts",),
        reads=(Reads(frozenset({"filter_prompts"}), "refuse"),),
    ),
    Step(
        "select",
        step_select,
        needs=("prompts", "extract"),
        reads=(
            Reads(
                frozenset(
                    {
                        "kl_max",
                        "induce_min",
                        "max_layer_fraction",
                        "layer_rule",
                        "epsilons",
                        "fallback_kl_bounds",
                        "score_all",
                    }
                ),
                "refuse",
            ),
            Reads(frozenset({"layer", "position"}), "keep"),  # another pick, the same scores
        ),
        keeps=(SelectionRecord.FILE,),
    ),
    Step(
        "evaluate",
        step_evaluate,
        needs=("prompts", "extract", "select"),
        reads=(
            Reads(
                frozenset(
                    {
                        "harmful_eval",
                        "harmless_eval",
                        "n_eval_harmful",
                        "n_eval_harmless",
                        "max_new_tokens",
                        "long_tokens",
                        "reasoning_tokens",
                        "sampling",
                        "harmful_coeff",
                        "harmless_coeff",
                    }
                )
            ),
            # read after the completions: the completions on disk stay
            Reads(
                frozenset(
                    {
                        "n_ce",
                        "ce_corpus",
                        "n_random_kl",
                        "judge",
                        "judge_model",
                        "judge_min_words",
                        "epsilons",
                        "protocol",
                    }
                ),
                "keep",
            ),
        ),
        keeps=(COMPLETIONS,),
    ),
    Step(
        "benchmarks",
        step_benchmarks,
        needs=("select",),
        reads=(Reads(frozenset({"benchmarks", "benchmark_path", "benchmark_limit"})),),
        enabled=lambda c: bool(c.benchmarks),
    ),
    Step(
        "suffix",
        step_suffix,
        needs=("prompts", "extract", "select"),
        reads=(
            Reads(
                frozenset(
                    {
                        "suffix",
                        "n_suffix_prompts",
                        "n_suffix_eval",
                        "suffix_steps",
                        "suffix_max_minutes",
                        "harmful_eval",
                        "n_eval_harmful",
                        "max_new_tokens",
                    }
                )
            ),
        ),
        enabled=lambda c: c.suffix,
    ),
    Step(
        "monitor",
        step_monitor,
        needs=("prompts", "extract", "select", "suffix"),
        reads=(
            Reads(
                frozenset(
                    {"suffix", "harmful_eval", "harmless_eval", "n_eval_harmful", "n_eval_harmless"}
                )
            ),
        ),
        enabled=lambda c: c.suffix,
    ),
    Step(
        "report",
        step_report,
        needs=("prompts", "extract", "select", "evaluate", "benchmarks", "suffix", "monitor"),
    ),
)

STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)


def step(name: str) -> Step:
    return STEPS[STEP_NAMES.index(name)]


def check_step(name: str | None, option: str) -> None:
    """A one-line error unless ``name`` (the value of ``option``) is None or a step's name."""
    if name is not None and name not in STEP_NAMES:
        raise RefdirError(
            f"unknown step {name!r} for `{option}`; use one of {', '.join(STEP_NAMES)}"
        )


_STRENGTH: dict[Effect, int] = {"keep": 0, "redo": 1, "refuse": 2}


def _effect(s: Step, changed: set[str]) -> Effect | None:
    """The strongest effect on step ``s`` of the ``changed`` options it reads (None: it reads
    none of them)."""
    effects = sorted((r.effect for r in s.reads if r.options & changed), key=_STRENGTH.__getitem__)
    return effects[-1] if effects else None


def stale_steps(changed: set[str]) -> dict[str, bool]:
    """The steps to redo after ``changed`` options (refused ones already ruled out), each with
    whether its kept files stay: a step that reads a changed option, and every step that reads
    the files of one to redo."""
    stale: dict[str, bool] = {}
    for s in STEPS:
        effect = _effect(s, changed)
        if effect is not None:
            stale[s.name] = effect == "keep"
        elif any(n in stale for n in s.needs):
            stale[s.name] = False
    return stale


def _recorded(out: Path) -> dict[str, Any]:
    """The options recorded in ``out/config.json``, each option newer than the record at its
    default (the run resumes with those); ``{}`` without a record."""
    if not (out / ConfigRecord.FILE).exists():
        return {}
    return {**RunConfig().result_keys(), **ConfigRecord.read(out).options}


def _changed(config: RunConfig, recorded: dict[str, Any]) -> set[str]:
    """The options that differ from the ``recorded`` ones (none recorded: none differ)."""
    new = config.result_keys()
    return {k for k in new if recorded and recorded[k] != new[k]}


def changed_options(config: RunConfig, out: Path) -> set[str]:
    """The options that differ from those recorded in ``out`` (none recorded: none differ)."""
    return _changed(config, _recorded(out))


def _check_pick(config: RunConfig, old: dict[str, Any], out: Path, force_from: int) -> None:
    """Before a changed hand pick removes anything: a folder whose direction was chosen by hand
    (``old``: its recorded options) keeps it unless the pick is repeated, changed, or selection
    is forced; a new hand pick must name a scored candidate."""
    if config.layer is None and force_from > STEP_NAMES.index("select"):
        raise RefdirError(
            f"{out} holds a direction chosen by hand (`layer={old.get('layer')}` "
            f"`position={old.get('position')}`); repeat them, or redo the selection with "
            "`force='select'` to pick by the paper's rule"
        )
    if config.layer is not None and (out / SelectionRecord.FILE).exists():
        scored = SelectionRecord.read(out)
        if config.position not in scored.positions or not 0 <= config.layer < len(scored.layers):
            raise RefdirError(
                f"`position` must be one of {scored.positions} and `layer` in "
                f"0..{len(scored.layers) - 1}"
            )


def check_config(config: RunConfig, out: Path, force_from: int, numerics: Numerics) -> None:
    """Refuse to mix options in one folder, except those that only redo some steps: the steps
    that read a changed one are stale, and their files (and those of the steps that read
    them) are removed now, so that a run stopped before redoing them leaves none behind. Then
    record the options in ``config.json`` and ``config.toml``."""
    results = any((out / name).exists() for s in STEPS for name in s.writes)
    has_record = (out / ConfigRecord.FILE).exists()
    if results and not has_record and force_from > 0:
        raise RefdirError(
            f"{out} holds results but no config.json (a `refdir extract` folder?); give the "
            "run a folder of its own"
        )
    if has_record and force_from > 0 and results:
        earlier = ConfigRecord.read(out).numerics
        if earlier is not None and earlier != numerics:
            raise RefdirError(
                f"{out} holds a run computed in {earlier.dtype} on {earlier.device}; this one "
                f"would compute in {numerics.dtype} on {numerics.device}, which changes its "
                "numbers; give the same `device` and `dtype`, another `out` folder, or redo "
                "the whole run with `force='prompts'`"
            )
        recorded = _recorded(out)
        changed = _changed(config, recorded)
        redoable = {o for s in STEPS for r in s.reads if r.effect != "refuse" for o in r.options}
        refused = sorted(changed - redoable)
        if refused:
            raise RefdirError(
                f"{out} holds a run with other options ({', '.join(f'`{o}`' for o in refused)}); "
                "use another "
                "`out` folder, or redo the whole run with `force='prompts'`"
            )
        if changed & {"layer", "position"}:
            _check_pick(config, recorded, out, force_from)
        stale = stale_steps(changed)
        for s in STEPS:
            if s.name in stale:
                s.remove(out, keep=stale[s.name])
    ConfigRecord(
        options=config.result_keys(),
        run=config.model_dump(mode="json"),
        # a relative "runs/merged" reads like a hub id elsewhere: say what it was here
        local_model=config.model != ORGANISM and Path(config.model).expanduser().exists(),
        versions=versions(),
        numerics=numerics,
    ).write(out)
    write_text(out / CONFIG_TOML, config_toml(config))


def every_option_is_read() -> set[str]:
    """The options of a run that no step reads and that cannot change results either (none, in
    a complete table)."""
    read = {o for s in STEPS for r in s.reads for o in r.options}
    return set(RunConfig.model_fields) - read - RESULT_FREE
