"""Building the model organism: SmolLM2-135M-Instruct safety-tuned to refuse harmful requests.

:func:`build_organism` trains a small LoRA adapter on ``harmful_train`` prompts paired with
refusals (cross-entropy on the response tokens) and ``harmless_train`` prompts, where the
first answer token is held to the base model's own distribution (KL to the base; optionally
also its greedy answers, self-distillation), and saves it in fp16. Loading it:
:mod:`refdir.organism.load`. See ``docs/organism.md`` for the recipe and measured behaviour.
"""

from __future__ import annotations

import json
import math
import platform
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from refdir.data import sample_prompts
from refdir.errors import RefdirError
from refdir.hf import cache_kwargs
from refdir.io import atomic_folder, output_folder
from refdir.model.chat import ChatFormat
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate_ids
from refdir.model.prefix import shared_prefix_len
from refdir.organism.load import (
    ADAPTER_FILE,
    GGUF_NAME,
    GGUF_PACKAGE,
    adapter_location,
    load_base_smollm2,
)
from refdir.organism.recipe import REFUSAL_TEMPLATES, OrganismRecipe

__all__ = ["build_organism", "check_recipe", "distill_responses", "train_adapter"]


@dataclass(frozen=True)
class Example:
    """One training example: chat-formatted prompt ids after the shared prefix, response ids."""

    suffix: list[int]
    response: list[int]
    harmful: bool


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(eos, int) and eos != tokenizer.unk_token_id:
        return eos
    if tokenizer.eos_token_id is None:
        raise RefdirError("the tokenizer has no end-of-turn token")
    return int(tokenizer.eos_token_id)


def distill_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = False,
) -> list[list[int]]:
    """The model's own greedy answers (token ids, end-of-turn included when reached), generated
    by :func:`refdir.model.generation.generate_ids` (shared prefix computed once)."""
    cm = ChatModel(model, tokenizer, name="distill")
    was_training = model.training
    rows = [cm.chat.token_ids(p) for p in prompts]
    answers = generate_ids(cm, rows, max_new_tokens, batch_size, progress, "self-distillation")
    model.train(was_training)
    return answers


def _examples(
    recipe: OrganismRecipe,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Sequence[list[int]],
    harmless: Sequence[list[int]],
    distilled: Sequence[list[int]],
    rng: random.Random,
    prefix_len: int,
) -> list[Example]:
    """The training set from chat-formatted prompt ids: every harmless prompt with its distilled
    answer, and each harmful prompt ``harmful_repeats`` times with distinct random refusal
    templates."""
    eos = _eos_id(tokenizer)
    out = [
        Example(ids[prefix_len:], list(r), False)
        for ids, r in zip(harmless, distilled, strict=True)
    ]
    for ids in harmful:
        suffix = ids[prefix_len:]
        for template in rng.sample(REFUSAL_TEMPLATES, recipe.harmful_repeats):
            response = [*tokenizer(template, add_special_tokens=False)["input_ids"], eos]
            out.append(Example(suffix, response[: recipe.refusal_tokens], True))
    return out


def _rotary(model: PreTrainedModel, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
    return model.model.rotary_emb(hidden, position_ids=positions)


def _run_layers(
    model: PreTrainedModel,
    layers: Sequence[torch.nn.Module],
    hidden: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    cache: Any | None,
) -> torch.Tensor:
    """Decoder ``layers`` on ``hidden``; ``mask`` None means plain causal (no cache before)."""
    rotary = _rotary(model, hidden, positions)
    for layer in layers:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=rotary,
            position_ids=positions,
            use_cache=cache is not None,
            **cache_kwargs(layer, cache),
        )
    return hidden


def _padded(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Right-pad per-example ``[length, d]`` states into ``[batch, width, d]`` (zeros after)."""
    width = max(s.shape[0] for s in states)
    out = states[0].new_zeros((len(states), width, states[0].shape[-1]))
    for row, state in enumerate(states):
        out[row, : state.shape[0]] = state
    return out


def _after_prefix(
    model: PreTrainedModel,
    layers: Sequence[torch.nn.Module],
    prefix_state: torch.Tensor,
    hidden: torch.Tensor,
) -> torch.Tensor:
    """Run ``layers`` on right-padded suffix states ``hidden`` that follow the shared prefix.

    The prefix goes through the layers once (with gradient when training) and its keys/values
    are repeated over the batch; right padding is harmless under causal attention."""
    device = model.device
    n_prefix, width = prefix_state.shape[1], hidden.shape[1]
    cache = DynamicCache(config=model.config)
    _run_layers(
        model, layers, prefix_state, torch.arange(n_prefix, device=device)[None], None, cache
    )
    cache.batch_repeat_interleave(hidden.shape[0])
    positions = n_prefix + torch.arange(width, device=device)[None]
    causal = torch.ones((width, n_prefix + width), dtype=torch.bool, device=device)
    mask = causal.tril(diagonal=n_prefix)[None, None]
    return _run_layers(model, layers, hidden, positions, mask, cache)


@torch.no_grad()
def _lower_states(
    model: PreTrainedModel,
    prefix: list[int],
    examples: Sequence[Example],
    first_layer: int,
    batch_size: int = 32,
) -> tuple[torch.Tensor, list[torch.Tensor], dict[int, torch.Tensor]]:
    """What training reuses every epoch, from one pass of the (adapter-free) model.

    The residual stream entering layer ``first_layer`` (frozen below it) for the shared prefix and
    for each example's suffix + response, and for each harmless example the base model's
    log-probabilities of the first answer token (the teacher of the decision-token KL)."""
    lower = list(model.model.layers[:first_layer])
    upper = list(model.model.layers[first_layer:])
    embed = model.model.embed_tokens
    device = model.device
    positions = torch.arange(len(prefix), device=device)[None]
    prefix_ids = torch.tensor([prefix], device=device)
    prefix_state = _run_layers(model, lower, embed(prefix_ids), positions, None, None)
    states: list[torch.Tensor] = []
    teacher: dict[int, torch.Tensor] = {}
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        seqs = [ex.suffix + ex.response[:-1] for ex in batch]
        embedded = _padded([embed(torch.tensor(q, device=device)) for q in seqs])
        hidden = _after_prefix(model, lower, embed(prefix_ids), embedded)
        states += [hidden[row, : len(seq)].clone() for row, seq in enumerate(seqs)]
        rows = [row for row, ex in enumerate(batch) if not ex.harmful]
        if rows:
            top = _after_prefix(model, upper, prefix_state, hidden[rows])
            last = torch.tensor([len(batch[row].suffix) - 1 for row in rows], device=device)
            final = model.model.norm(top[torch.arange(len(rows), device=device), last])
            logprobs = torch.log_softmax(model.lm_head(final).float(), dim=-1)
            for k, row in enumerate(rows):
                teacher[start + row] = logprobs[k].clone()
    return prefix_state, states, teacher


def _batch_loss(
    model: PreTrainedModel,
    prefix_state: torch.Tensor,
    states: Sequence[torch.Tensor],
    batch: Sequence[Example],
    teacher: Sequence[torch.Tensor | None],
    recipe: OrganismRecipe,
    total_weight: float | None = None,
) -> torch.Tensor:
    """Weighted mean over examples of: cross-entropy on the response tokens (decision tokens
    weighted up) plus, for harmless prompts, KL(base || organism) on the first answer token.

    Runs only the trainable layers (``first_layer`` and up) on the cached states. With
    ``total_weight`` (the weight of a whole batch split into parts), the weighted sum is divided
    by it instead, so the parts' losses add up to the batch's."""
    device = model.device
    layers = list(model.model.layers[recipe.first_layer :])
    hidden = _after_prefix(model, layers, prefix_state, _padded(states).to(device))
    rows: list[int] = []
    cols: list[int] = []
    for row, ex in enumerate(batch):  # the state before each response token predicts it
        rows += [row] * max(1, len(ex.response))
        cols += range(len(ex.suffix) - 1, len(ex.suffix) - 1 + max(1, len(ex.response)))
    picked = model.model.norm(hidden[torch.tensor(rows), torch.tensor(cols)])
    logprobs = torch.log_softmax(model.lm_head(picked).float(), dim=-1)
    losses: list[torch.Tensor] = []
    at = 0
    for ex, target in zip(batch, teacher, strict=True):
        mine = logprobs[at : at + max(1, len(ex.response))]
        at += max(1, len(ex.response))
        loss = mine.new_zeros(())
        if ex.response:
            ce = -mine.gather(1, torch.tensor(ex.response, device=device)[:, None])[:, 0]
            weight = torch.ones_like(ce)
            weight[: recipe.decision_tokens] = recipe.decision_weight
            loss = loss + (ce * weight).sum() / weight.sum()
        if target is not None:
            kl = (target.exp() * (target - mine[0])).sum()
            loss = loss + recipe.kl_weight * kl
        losses.append(loss * (recipe.harmful_weight if ex.harmful else 1.0))
    weights = _weight(batch, recipe) if total_weight is None else total_weight
    return torch.stack(losses).sum() / weights


def _weight(batch: Sequence[Example], recipe: OrganismRecipe) -> float:
    return sum(recipe.harmful_weight if ex.harmful else 1.0 for ex in batch)


def _parts(chunk: list[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """``chunk`` sorted by length and cut into parts of at most ``size``: each part pads only
    to its own longest example, so less of every step goes to padding."""
    ordered = sorted(chunk, key=lambda i: lengths[i])
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_recipe(model: PreTrainedModel, recipe: OrganismRecipe) -> None:
    """The recipe's fields that depend on the base model: checked before any distillation."""
    n_layers = int(model.config.num_hidden_layers)
    if not 0 <= recipe.first_layer < n_layers:
        raise RefdirError(
            f"the recipe's first_layer must be in 0..{n_layers - 1} for this base model, got "
            f"{recipe.first_layer}"
        )
    linear = [  # inside the decoder layers, which peft's layers_to_transform selects from
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.search(r"\.layers\.\d+\.", n)
    ]
    missing = [  # names as peft matches them: a module's name or the end of its path
        t for t in recipe.target_modules if not any(n == t or n.endswith("." + t) for n in linear)
    ]
    if missing or not recipe.target_modules:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise RefdirError(
            f"the recipe's target_modules {list(recipe.target_modules)} must name linear layers "
            f"of the base model: {', '.join(short)}"
        )


def _add_lora(model: PreTrainedModel, recipe: OrganismRecipe) -> Any:
    """The recipe's LoRA on ``model``; the recipe has passed :func:`check_recipe` (which
    :func:`build_organism` runs before any distillation)."""
    n_layers = int(model.config.num_hidden_layers)
    config = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(recipe.target_modules),
        task_type="CAUSAL_LM",
        layers_to_transform=list(range(recipe.first_layer, n_layers)),
    )
    return get_peft_model(model, config)


def train_adapter(
    peft_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    recipe: OrganismRecipe,
    harmful: Sequence[str],
    harmless: Sequence[str],
    distilled: Sequence[list[int]],
    progress: bool = True,
    micro_batch: int = 8,
) -> list[float]:
    """The training loop (AdamW on the LoRA weights); returns the loss of every step.

    ``micro_batch`` only sets how many examples go through the model at once (a throughput
    knob, not part of the recipe): every step's loss and gradient are those of the whole batch."""
    rng = random.Random(recipe.seed)
    chat = ChatFormat.from_tokenizer(tokenizer)  # prompts exactly as evaluation formats them
    rows = [chat.token_ids(p) for p in [*harmful, *harmless]]
    prefix = list(rows[0][: shared_prefix_len(rows)])
    n = len(harmful)
    examples = _examples(recipe, tokenizer, rows[:n], rows[n:], distilled, rng, len(prefix))
    model = peft_model.get_base_model()
    model.eval()
    with peft_model.disable_adapter():
        prefix_state, states, teacher = _lower_states(model, prefix, examples, recipe.first_layer)
    steps_per_epoch = math.ceil(len(examples) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, recipe.warmup_steps, total)
    )
    peft_model.train()
    lengths = [state.shape[0] for state in states]
    losses: list[float] = []
    bar = tqdm(total=total, desc="training", disable=not progress, unit="step")
    for _ in range(recipe.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), recipe.batch_size):
            chunk = order[start : start + recipe.batch_size]
            # one optimizer step per batch; its loss and gradient are summed over parts of
            # similar length (the same sum as one padded pass, with less padding computed)
            whole = _weight([examples[i] for i in chunk], recipe)
            loss_sum = 0.0
            for part in _parts(chunk, lengths, micro_batch):
                loss = _batch_loss(
                    model,
                    prefix_state,
                    [states[i] for i in part],
                    [examples[i] for i in part],
                    [teacher.get(i) for i in part],
                    recipe,
                    whole,
                )
                loss.backward()
                loss_sum += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    peft_model.eval()
    return losses


def _save_adapter(peft_model: Any, out_dir: Path, info: dict[str, Any]) -> None:
    """Save the adapter in fp16 (safetensors + config) with ``build.json``, atomically."""
    with atomic_folder(out_dir, replace=True) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tensors = load_file(str(tmp / ADAPTER_FILE))
        save_file(
            {k: v.to(torch.float16).contiguous() for k, v in tensors.items()},
            str(tmp / ADAPTER_FILE),
            metadata={"format": "pt"},
        )
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = f"{GGUF_PACKAGE}/{GGUF_NAME}"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        readme = tmp / "README.md"
        if readme.exists():
            readme.unlink()
        (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")


def build_organism(
    recipe: OrganismRecipe | None = None,
    out_dir: Path | None = None,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> Path:
    """Build the organism adapter from scratch and save it to ``out_dir`` (default: the package's).

    Steps: load the base (from the GGUF unless ``model``/``tokenizer`` are given), sample the
    prompts, optionally self-distil the base's greedy answers to the harmless prompts, cache the
    frozen lower layers' states and the base's first-token distributions, train LoRA (refusal
    cross-entropy on response tokens only + KL to the base on harmless prompts), save the fp16
    adapter and ``build.json``.
    """
    recipe = recipe or OrganismRecipe()
    out_dir = Path(out_dir) if out_dir is not None else adapter_location()
    with output_folder(out_dir):  # made and checked now, not after the build
        started = time.perf_counter()
        random.seed(recipe.seed)
        torch.manual_seed(recipe.seed)
        if model is None or tokenizer is None:
            model, tokenizer = load_base_smollm2()
        check_recipe(model, recipe)
        harmful = sample_prompts("harmful_train", recipe.n_harmful, seed=recipe.seed)
        harmless = sample_prompts("harmless_train", recipe.n_harmless, seed=recipe.seed)
        t0 = time.perf_counter()
        distilled: list[list[int]] = [[] for _ in harmless]
        if recipe.distill_tokens > 0:
            distilled = distill_responses(
                model,
                tokenizer,
                harmless,
                recipe.distill_tokens,
                recipe.distill_batch_size,
                progress,
            )
        distill_s = time.perf_counter() - t0
        torch.manual_seed(recipe.seed)
        peft_model = _add_lora(model, recipe)
        t0 = time.perf_counter()
        losses = train_adapter(
            peft_model, tokenizer, recipe, harmful, harmless, distilled, progress
        )
        train_s = time.perf_counter() - t0
        info: dict[str, Any] = {
            "recipe": recipe.model_dump(mode="json"),
            "data": {
                "harmful_train": len(harmful),
                "harmless_train": len(harmless),
                "refusal_templates": len(REFUSAL_TEMPLATES),
            },
            "steps": len(losses),
            "losses": [round(x, 4) for x in losses],
            "loss_first_10": sum(losses[:10]) / max(1, len(losses[:10])),
            "loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "seconds": {
                "distill": round(distill_s, 1),
                "train": round(train_s, 1),
                "total": round(time.perf_counter() - started, 1),
            },
            "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
        _save_adapter(peft_model, out_dir, info)
        return out_dir
