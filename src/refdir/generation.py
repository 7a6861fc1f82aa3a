"""Greedy batched generation and last-position logits, through the model's chat format."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from refdir.activations import batches
from refdir.model import ChatModel

__all__ = ["generate", "last_position_logits"]


def generate(
    cm: ChatModel,
    instructions: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
    suffix: str = "",
) -> list[str]:
    """Greedy completions, one per instruction (``suffix`` is appended to each instruction)."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=cm.chat.pad_id,
        eos_token_id=cm.tokenizer.eos_token_id,
    )
    completions: list[str] = []
    for chunk in tqdm(batches(instructions, batch_size), desc="generate", disable=not progress):
        batch = cm.chat.encode(chunk, suffix).to(cm.device)
        with torch.inference_mode():
            out = cm.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                generation_config=config,
            )
        new = out[:, batch.input_ids.shape[1] :]
        completions.extend(cm.tokenizer.batch_decode(new, skip_special_tokens=True))
    return completions


def last_position_logits(
    cm: ChatModel, instructions: Sequence[str], batch_size: int = 32, suffix: str = ""
) -> torch.Tensor:
    """[N, vocab] float32 logits at the last prompt position (the first response token)."""
    rows: list[torch.Tensor] = []
    for chunk in batches(instructions, batch_size):
        batch = cm.chat.encode(chunk, suffix).to(cm.device)
        with torch.inference_mode():
            out = cm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                use_cache=False,
                logits_to_keep=1,
            )
        rows.append(out.logits[:, -1].float().cpu())
    return torch.cat(rows)
