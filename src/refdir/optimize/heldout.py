"""The held-out check of an optimization: the model as it is, the paper's edit and the chosen
edit on the held-out harmful and harmless prompts, with the measures the run's evaluation uses
(refusals by markers at two lengths, KL at the last prompt position, CE on text and on the
model's own harmless completions, and activation addition of the chosen direction)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from refdir.artifacts.pareto import HeldoutRecord, HeldoutResult
from refdir.data import load_corpus
from refdir.directions.direction import Direction
from refdir.evaluation.kl import kl_by_prompt
from refdir.evaluation.losses import ce_loss, ce_loss_on_completions
from refdir.evaluation.refusal import evaluate_refusal
from refdir.interventions.intervention import NONE, Intervention
from refdir.model.chat_model import ChatModel
from refdir.model.generation import last_position_logits
from refdir.study.config import RunConfig
from refdir.study.steps.shared import eval_prompts

__all__ = ["heldout"]


def heldout(
    cm: ChatModel,
    config: RunConfig,
    conditions: Mapping[str, Intervention],
    addition: Direction | None,
    long_tokens: int | None,
    progress: bool = True,
) -> HeldoutRecord:
    """Each condition (``none`` first) on the run's held-out sets; ``addition``: the direction
    whose activation addition is measured on the harmless prompts, under the last condition's
    label."""
    by_set, harmful, harmless = eval_prompts(config)
    tokens, batch = config.max_new_tokens, config.gen_batch_size
    baseline = last_position_logits(cm, harmless, config.batch_size)
    texts = load_corpus(n=config.n_ce)
    own = evaluate_refusal(cm, harmless, "harmless", NONE, tokens, batch, progress)
    own_texts = [c.completion for c in own.completions]
    results = []
    for label, intervention in conditions.items():
        refusal = evaluate_refusal(cm, harmful, "harmful", intervention, tokens, batch, progress)
        long = None
        if long_tokens is not None and intervention.kind != "none":
            long = evaluate_refusal(
                cm, harmful, "harmful", intervention, long_tokens, batch, progress
            ).refusal_rate
        answered = (
            own
            if intervention.kind == "none"
            else evaluate_refusal(cm, harmless, "harmless", intervention, tokens, batch, progress)
        )
        kl = kl_by_prompt(cm, harmless, intervention, baseline, config.batch_size)
        with intervention.apply(cm):
            ce = ce_loss(cm, texts, progress=progress)
            ce_own = (
                ce_loss_on_completions(cm, harmless, own_texts, progress=progress)
                if any(t.strip() for t in own_texts)
                else None
            )
        induced = None
        if addition is not None and label == list(conditions)[-1]:
            induced = evaluate_refusal(
                cm, harmless, "harmless", Intervention.addition(addition), tokens, batch, progress
            ).refusal_rate
        results.append(
            HeldoutResult(
                label=label,
                refusal_harmful=round(refusal.refusal_rate, 4),
                refusal_harmful_long=round(long, 4) if long is not None else None,
                refusal_harmless=round(answered.refusal_rate, 4),
                kl_mean=round(float(kl.mean()), 5),
                kl_median=round(float(torch.median(kl)), 5),
                ce_text=round(ce, 5),
                ce_own_completions=round(ce_own, 5) if ce_own is not None else None,
                actadd_harmless_refusal=round(induced, 4) if induced is not None else None,
            )
        )
    return HeldoutRecord(
        harmful_sets=list(by_set),
        n_harmful=len(harmful),
        n_harmless=len(harmless),
        max_new_tokens=tokens,
        long_tokens=long_tokens,
        results=results,
    )
