"""Step ``prompts``: sample the prompt sets, and find the tokens that start the model's
refusals (or take them from ``refusal_tokens``)."""

from __future__ import annotations

from refdir.artifacts.run import PromptSets, RefusalTokensRecord
from refdir.directions.refusal_tokens import derive_refusal_tokens, family_refusal_tokens
from refdir.errors import RefdirError
from refdir.study.state import Run
from refdir.study.steps.shared import sampled_sets

__all__ = ["step_prompts"]


def step_prompts(run: Run) -> None:
    c, cm = run.config, run.cm
    drawn = sampled_sets(c)
    sets = PromptSets(
        harmful_train=drawn[0], harmless_train=drawn[1], harmful_val=drawn[2], harmless_val=drawn[3]
    )
    family = (
        family_refusal_tokens(cm.tokenizer, str(getattr(cm.model.config, "model_type", "")))
        if c.family_refusal_tokens and c.refusal_tokens is None
        else None
    )
    if c.refusal_tokens is not None:
        vocab = int(cm.model.get_output_embeddings().weight.shape[0])
        outside = [t for t in c.refusal_tokens if not 0 <= t < vocab]
        if outside:
            raise RefdirError(
                f"`refusal_tokens`: token id {outside[0]} is outside the model's vocabulary "
                f"(0..{vocab - 1})"
            )
        ids = list(c.refusal_tokens)
        tokens = RefusalTokensRecord(
            ids=ids, source="option refusal_tokens", texts=[cm.tokenizer.decode([t]) for t in ids]
        )
    elif family is not None:
        ids = list(family.ids)
        tokens = RefusalTokensRecord(
            ids=ids,
            source=f"the paper's code, for the {family.family} family",
            texts=[cm.tokenizer.decode([t]) for t in ids],
        )
    else:
        found = derive_refusal_tokens(
            cm,
            sets.harmful_train[: c.n_refusal_probe],
            batch_size=c.gen_batch_size,
            progress=run.progress,
        )
        tokens = RefusalTokensRecord(
            ids=list(found.ids),
            coverage=found.coverage,
            n_refusals=found.n_refusals,
            n_prompts=found.n_prompts,
            source="first token ids the model emitted in its own refusals",
            texts=[cm.tokenizer.decode([t]) for t in found.ids],
        )
    tokens.write(run.out)
    # the sets as sampled: each later step filters the prompts it uses in its own pass
    # (training prompts in extract, validation prompts in select)
    sets.write(run.out)
