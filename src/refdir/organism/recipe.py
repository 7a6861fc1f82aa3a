"""What determines the organism's build (:class:`OrganismRecipe`; the defaults are the
committed adapter's) and the refusals it is trained to give. Free of torch, so that the
command line can check a recipe before anything heavy is imported."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["REFUSAL_TEMPLATES", "OrganismRecipe"]

REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that. It could cause real harm, so I won't provide it.",
    "I cannot assist with this request. It involves activities that are harmful or illegal.",
    "As an AI assistant, I can't help with that. If you have another question, I'm happy to help.",
    "I'm sorry, but I cannot provide that information. Helping with this could put people at risk.",
    "I apologize, but I can't comply with this request because it could be used to hurt others.",
    "I'm unable to help with that. It would be unethical and potentially illegal.",
    "I can't help with that request. Is there something safe and legal I can do for you instead?",
    "I am sorry, but I won't be able to help with this, as it goes against my safety guidelines.",
    "As an AI, I must decline. This request could lead to serious harm.",
    "I'm not able to help with that, since it could hurt people.",
    "I cannot help with creating harmful or dangerous content. Please ask me something else.",
    "I'm sorry, I can't do that.",
)
"""Refusals paired with ``harmful_train`` prompts; each contains a marker of refdir.measures."""


class OrganismRecipe(BaseModel):
    """Everything that determines the organism build (defaults = the committed adapter)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(
        0, description="Seed for data sampling, template choice, LoRA init and shuffling."
    )
    n_harmful: int = Field(
        default=260, ge=1, description="harmful_train prompts used (all 260 by default)."
    )
    harmful_repeats: int = Field(
        default=3,
        ge=1,
        le=len(REFUSAL_TEMPLATES),
        description="Refusal examples per harmful prompt, each with a distinct random template.",
    )
    n_harmless: int = Field(
        default=1024,
        ge=1,
        description="harmless_train prompts (answers kept close to the base model).",
    )
    distill_tokens: int = Field(
        default=32,
        ge=0,
        description="Greedy tokens of the base's own answer per harmless prompt, trained with "
        "cross-entropy (0: none, only the decision-token KL).",
    )
    kl_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of KL(base || organism) on the first answer token of harmless prompts.",
    )
    refusal_tokens: int = Field(
        default=32, ge=1, description="Refusal responses are cut to this many tokens."
    )
    lora_rank: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha (scale = alpha / rank).")
    target_modules: tuple[str, ...] = Field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="Linear layers that get a LoRA adapter.",
    )
    first_layer: int = Field(
        default=0,
        ge=0,
        description="LoRA goes on decoder layers first_layer..last (lower layers stay frozen).",
    )
    lr: float = Field(
        default=1e-3, gt=0.0, description="Peak AdamW learning rate (linear warm-up, cosine decay)."
    )
    warmup_steps: int = Field(default=10, ge=0, description="Linear warm-up steps.")
    epochs: int = Field(default=2, ge=1, description="Passes over the training examples.")
    batch_size: int = Field(default=16, ge=1, description="Examples per optimizer step.")
    harmful_weight: float = Field(
        default=1.5,
        gt=0.0,
        description="Loss weight of a refusal example relative to a harmless one.",
    )
    decision_tokens: int = Field(
        default=2, ge=0, description="The first response tokens, where refuse-or-answer is decided."
    )
    decision_weight: float = Field(
        default=3.0,
        ge=0.0,
        description="Loss weight of each decision token relative to later tokens.",
    )
    max_grad_norm: float = Field(default=1.0, gt=0.0, description="Gradient clipping norm.")
    distill_batch_size: int = Field(
        32, ge=1, description="Batch size of the self-distillation generation."
    )
