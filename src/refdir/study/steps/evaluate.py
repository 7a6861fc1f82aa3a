"""Step ``evaluate``: completions of the held-out prompts under each condition (one set of
decoding batches for all), their refusal scores by markers (and safety scores, with a judge),
the KL of ablation on harmless prompts, and the cross-entropy on text and on the model's own
completions. Completion files on disk are read back instead of generated again."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from refdir.artifacts.metrics import (
    Coefficients,
    DirectionSummary,
    HarmfulScores,
    Harmless,
    HarmlessScores,
    Kept,
    LongRefusal,
    MetricsRecord,
    ReasoningScores,
    SelectionSummary,
    Sizes,
    ThreeConditions,
)
from refdir.artifacts.run import (
    CANDIDATES,
    DIRECTION_TENSOR,
    Completion,
    PromptSets,
    RefusalTokensRecord,
)
from refdir.artifacts.selection import SelectionRecord
from refdir.data import prompt_categories, read_corpus
from refdir.directions.candidates import Candidates
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.judges import JUDGES, load_judge, safety_score
from refdir.evaluation.kl import kl_summary, random_direction_kl, random_kl_summary
from refdir.evaluation.losses import ce_losses, completion_rows, text_rows
from refdir.evaluation.refusal import (
    Job,
    evaluate_jobs,
    no_answer_rate,
    reasoning_refusal_rate,
)
from refdir.interventions.intervention import NONE, Intervention
from refdir.io import write_jsonl
from refdir.measures import KL_EPSILON, kl_divergence
from refdir.model.loading import names_local_path
from refdir.model.thinking import score_completion
from refdir.study.config import RunConfig
from refdir.study.files import COMPLETIONS
from refdir.study.state import Run
from refdir.study.steps.shared import eval_prompts

__all__ = ["check_judge", "completion_tokens", "step_evaluate"]

Key = tuple[str, str]
"""(prompt group, condition) of a completion file ``completions/{group}.{condition}.jsonl``."""

LONG = "ablation_long"
"""The condition of the harmful prompts' ablated completions at ``long_tokens``."""


def _completion_file(out: Path, key: Key) -> Path:
    return out / Path(COMPLETIONS).parent / f"{key[0]}.{key[1]}.jsonl"


def _completions(
    run: Run, jobs: Mapping[Key, tuple[list[str], Intervention, int]]
) -> dict[Key, list[Completion]]:
    """Completions of each (group, condition) job at its number of new tokens, read back when
    its file is there; the jobs still missing are generated together (those of one length in
    the same decoding batches), every row under its own job's intervention."""
    paths = {key: _completion_file(run.out, key) for key in jobs}
    done = {
        key: [
            Completion.model_validate(json.loads(line))
            for line in path.read_text(encoding="utf-8").splitlines()
        ]
        for key, path in paths.items()
        if path.exists()
    }
    missing = [key for key in jobs if key not in done]
    for length in sorted({jobs[key][2] for key in missing}):
        keys = [key for key in missing if jobs[key][2] == length]
        c, cm = run.config, run.cm
        with run.watch.part("completions"):
            results = evaluate_jobs(
                cm,
                [Job(".".join(key), *jobs[key][:2]) for key in keys],
                length,
                c.gen_batch_size,
                run.progress,
            )
        for key, result in zip(keys, results, strict=True):
            done[key] = result.completions
            write_jsonl(paths[key], [r.model_dump(exclude_defaults=True) for r in done[key]])
    return {key: done[key] for key in jobs}


def _rate(records: Sequence[Completion], subset: set[str] | None = None) -> float:
    chosen = [r for r in records if subset is None or r.prompt in subset]
    return round(sum(r.refusal for r in chosen) / len(chosen), 4) if chosen else 0.0


def _three(values: Mapping[str, float]) -> ThreeConditions:
    return ThreeConditions(**values)


def _sizes(
    run: Run, by_set: dict[str, list[str]], harmful: list[str], harmless: list[str]
) -> Sizes:
    """Prompts sampled and kept by the refusal-metric filter, per set: the training sets are
    filtered in the extract step's pass (the candidates record how many prompts their means are
    over), the validation sets in the select step's (selection.json); and the held-out sets."""
    prompts = PromptSets.read(run.out)
    cands = Candidates.load(run.out / CANDIDATES.FILE, CANDIDATES.fix())
    validation = SelectionRecord.read(run.out).validation.filter
    counts = {
        "harmful_train": Kept(sampled=len(prompts.harmful_train), kept=cands.n_harmful),
        "harmless_train": Kept(sampled=len(prompts.harmless_train), kept=cands.n_harmless),
        "harmful_val": validation.harmful_val,
        "harmless_val": validation.harmless_val,
    }
    return Sizes(
        **{k: v.kept for k, v in counts.items()},
        filter=counts,
        harmful_eval={k: len(v) for k, v in by_set.items()},
        harmful_eval_unique=len(harmful),
        harmless_eval={run.config.harmless_eval: len(harmless)},
    )


def step_evaluate(run: Run) -> None:
    c, out, cm = run.config, run.out, run.cm
    direction = Direction.load(out, DIRECTION_TENSOR.fix())
    by_set, harmful, harmless = eval_prompts(c)
    conditions = {
        "baseline": NONE,
        "ablation": Intervention.ablation(direction),
        "actadd": Intervention.addition(direction, c.harmful_coeff),
    }
    # the completions of one length decode in the same batches, each row under its condition
    n = completion_tokens(c, cm.chat.thinks)
    jobs: dict[Key, tuple[list[str], Intervention, int]] = {
        ("harmful", "baseline"): (harmful, NONE, n),
        ("harmless", "baseline"): (harmless, NONE, n),
        ("harmful", "ablation"): (harmful, conditions["ablation"], n),
        ("harmful", "actadd"): (harmful, conditions["actadd"], n),
        ("harmless", "actadd"): (harmless, Intervention.addition(direction, c.harmless_coeff), n),
        ("harmless", "ablation"): (harmless, conditions["ablation"], n),
    }
    if c.long_tokens > n:
        jobs["harmful", LONG] = (harmful, conditions["ablation"], c.long_tokens)
    runs = _completions(run, jobs)
    harmful_runs = {name: runs["harmful", name] for name in ("baseline", "ablation", "actadd")}
    harmless_runs = {name: runs["harmless", name] for name in ("baseline", "actadd", "ablation")}
    text = read_corpus(c.ce_corpus, c.n_ce)
    corpus = (
        completion_rows(cm, text.texts, text.outputs)
        if text.outputs is not None
        else text_rows(cm, text.texts)
    )
    own = completion_rows(cm, harmless, [r.completion for r in harmless_runs["baseline"]])
    with run.watch.part("ce text"):
        on_text = ce_losses(cm, corpus, conditions, progress=run.progress)
    with run.watch.part("ce and kl on own completions"):
        on_own = ce_losses(cm, own, conditions, progress=run.progress, desc="ce loss (completions)")
    # the KL score's distributions are the logits that predict each completion's first token
    kl = kl_divergence(
        on_own["baseline"].first, on_own["ablation"].first, KL_EPSILON if c.epsilons else 0.0
    )
    refused = {r.prompt: r.refusal for r in harmless_runs["baseline"]}
    selection = SelectionRecord.read(out)
    if selection.chosen is None:
        raise RefdirError(
            f"{out / SelectionRecord.FILE} names no chosen candidate; redo it with `force='select'`"
        )
    reference = None
    if c.n_random_kl > 0:
        with run.watch.part("random directions"):
            scores = random_direction_kl(
                cm,
                harmless,
                c.n_random_kl,
                c.seed,
                on_own["baseline"].first,
                c.batch_size,
                run.progress,
            )
        reference = random_kl_summary(scores, float(kl.mean()), c.seed)
    safety = _safety(run, harmful_runs) if c.judge is not None else None
    long = None
    if ("harmful", LONG) in runs:
        long = LongRefusal(
            max_new_tokens=c.long_tokens,
            ablation=_rate(runs["harmful", LONG]),
            by_set={name: _rate(runs["harmful", LONG], set(ps)) for name, ps in by_set.items()},
        )
    metrics = MetricsRecord(
        model=c.model,
        protocol=c.protocol,
        direction=DirectionSummary(
            layer=direction.layer, position=direction.position, norm=round(direction.norm, 5)
        ),
        selection=SelectionSummary(
            rule=selection.rule,
            fallback=selection.fallback,
            n_candidates=selection.n_candidates,
            n_passed=selection.n_passed,
            bypass=selection.chosen.bypass,
            induce=selection.chosen.induce,
            kl=selection.chosen.kl,
        ),
        refusal_tokens=RefusalTokensRecord.read(out).texts,
        sizes=_sizes(run, by_set, harmful, harmless),
        harmful=HarmfulScores(
            refusal_score=_three({k: _rate(v) for k, v in harmful_runs.items()}),
            by_set={
                name: _three({k: _rate(v, set(ps)) for k, v in harmful_runs.items()})
                for name, ps in by_set.items()
            },
            by_category=_by_category(by_set, harmful_runs),
            refusal_score_long=long,
            safety_score=safety,
            safety_min_words=c.judge_min_words
            if safety is not None and c.judge_min_words
            else None,
        ),
        harmless=Harmless(
            refusal_score=HarmlessScores(**{k: _rate(v) for k, v in harmless_runs.items()}),
            kl_ablation=round(float(kl.mean()), 5),
            kl_ablation_spread=kl_summary(kl, [refused[p] for p in harmless]),
            kl_random_directions=reference,
        ),
        ce_loss=_three({name: round(losses.ce, 5) for name, losses in on_text.items()}),
        ce_corpus=text.name,
        ce_loss_own_completions=(
            _three({name: round(losses.ce, 5) for name, losses in on_own.items()})
            if on_own["baseline"].n_tokens
            else None
        ),
        coefficients=Coefficients(harmful_actadd=c.harmful_coeff, harmless_actadd=c.harmless_coeff),
        reasoning=_reasoning(run, n, runs) if cm.chat.thinks else None,
    )
    metrics.write(out)


def completion_tokens(c: RunConfig, thinks: bool) -> int:
    """New tokens per completion: ``reasoning_tokens`` when the chat template thinks (and it is
    set above ``max_new_tokens``), else ``max_new_tokens``."""
    return max(c.max_new_tokens, c.reasoning_tokens) if thinks else c.max_new_tokens


def _reasoning(run: Run, n: int, runs: Mapping[Key, list[Completion]]) -> ReasoningScores:
    """What the think blocks did, per (group, condition) completed at ``n`` tokens."""
    no_answer: dict[str, dict[str, float]] = {}
    marked: dict[str, dict[str, float | None]] = {}
    for (group, condition), records in runs.items():
        if condition == LONG:
            continue
        no_answer.setdefault(group, {})[condition] = round(no_answer_rate(records), 4)
        marks = reasoning_refusal_rate(records)
        marked.setdefault(group, {})[condition] = None if marks is None else round(marks, 4)
    return ReasoningScores(
        max_new_tokens=n,
        instead_of=run.config.max_new_tokens,
        opened_by_template=run.cm.chat.opens_reasoning,
        no_answer=no_answer,
        reasoning_refusal=marked,
    )


def _by_category(
    by_set: Mapping[str, list[str]], harmful_runs: Mapping[str, list[Completion]]
) -> dict[str, dict[str, ThreeConditions]] | None:
    """The refusal score per category of each set that has categories (JailbreakBench)."""
    found: dict[str, dict[str, ThreeConditions]] = {}
    for name, prompts in by_set.items():
        categories = prompt_categories(name)
        groups: dict[str, set[str]] = {}
        for prompt in prompts:
            if prompt in categories:
                groups.setdefault(categories[prompt], set()).add(prompt)
        if groups:
            found[name] = {
                category: _three({k: _rate(v, members) for k, v in harmful_runs.items()})
                for category, members in sorted(groups.items())
            }
    return found or None


def check_judge(c: RunConfig) -> tuple[str, str]:
    """The judge's registered name and model folder: an unknown name (close names suggested)
    or a judge without a model is an error."""
    if c.judge is None:
        raise RefdirError("no judge set; give `judge` and `judge_model`")
    JUDGES.get(c.judge)
    if c.judge_model is None:
        raise RefdirError("`judge` needs `judge_model` (a local judge model folder)")
    path = Path(c.judge_model).expanduser()
    if names_local_path(c.judge_model) or path.exists():
        if not path.is_dir():
            raise RefdirError(
                f"`judge_model` {c.judge_model}: no such folder; give the judge's folder"
            )
        if not (path / "config.json").is_file():
            raise RefdirError(
                f"`judge_model` {c.judge_model} has no config.json; give the judge model's folder"
            )
    return c.judge, c.judge_model


def _safety(run: Run, harmful_runs: dict[str, list[Completion]]) -> ThreeConditions:
    c = run.config
    name, model = check_judge(c)
    judge = load_judge(
        name,
        model,
        device=c.device,
        dtype=c.dtype,
        progress=run.progress,
        trust_remote_code=c.trust_remote_code,
    )
    opened = run.cm.chat.opens_reasoning  # a reasoning model's answers, after its think blocks
    with run.watch.part("judge"):  # loading the judge model is not a part
        return _three(
            {
                k: round(
                    safety_score(
                        judge,
                        [r.prompt for r in v],
                        [score_completion(r.completion, opened).answer for r in v],
                        c.judge_min_words,
                    ),
                    4,
                )
                for k, v in harmful_runs.items()
            }
        )
