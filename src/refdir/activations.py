"""Streaming means of the residual stream at the post-instruction positions.

For every batch, hooks on the decoder layers take the last ``n_post`` positions of each
layer's input (and of the last layer's output), sum them over the batch in float64 and add
them to running sums. Nothing per prompt is kept beyond the current batch and layer. The
prompt prefix that every prompt shares runs once; its keys/values serve every batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from refdir.chat import by_length
from refdir.direction import Candidates
from refdir.errors import RefdirError
from refdir.generation import SharedPrefix
from refdir.hooks import hooked, residual_stream
from refdir.model import ChatModel

__all__ = ["extract_candidates", "residual_means"]


def residual_means(
    cm: ChatModel,
    instructions: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "activations",
) -> torch.Tensor:
    """Mean residual stream [P, L+1, d] (float64, on CPU) at the post-instruction positions."""
    if not instructions:
        raise RefdirError("no prompts to take activations from")
    n_post, n_layers = cm.chat.n_post, cm.n_layers
    sums = torch.zeros(n_post, n_layers + 1, cm.d_model, dtype=torch.float64)

    def accumulate(index: int, hidden: torch.Tensor) -> None:
        sums[:, index] += hidden[:, -n_post:].detach().to("cpu", torch.float64).sum(0)

    rows = [cm.chat.token_ids(text) for text in instructions]
    # the prefix every prompt shares (system prompt, header) runs once, cut so that it never
    # reaches into the post-instruction positions (identical prompts)
    short = min(len(r) for r in rows) - n_post
    hooks = residual_stream(cm.layout.layers, accumulate)
    with torch.inference_mode():
        prefix = SharedPrefix.build(cm, rows, at_most=short)
        with hooked(hooks):
            for chunk in tqdm(
                by_length(rows, batch_size), desc=desc, disable=not progress, unit="batch"
            ):
                prefix.logits(cm, [rows[i] for i in chunk])
    return sums / len(instructions)


def extract_candidates(
    cm: ChatModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
    harmful_name: str | None = None,
    harmless_name: str | None = None,
) -> Candidates:
    """Difference-of-means candidates for every post-instruction position and layer."""
    mu_harmful = residual_means(cm, harmful, batch_size, progress, "harmful activations")
    mu_harmless = residual_means(cm, harmless, batch_size, progress, "harmless activations")
    return Candidates(
        mu_harmful,
        mu_harmless,
        cm.name,
        cm.revision,
        harmful_name,
        harmless_name,
        len(harmful),
        len(harmless),
    )
