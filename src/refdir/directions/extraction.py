"""Streaming means of the residual stream at the post-instruction positions.

For every batch, hooks on the decoder layers take the last ``n_post`` positions of each
layer's input (and of the last layer's output); once the batch's last-position logits are
known (and with them which prompts pass a filter, such as the paper's refusal-metric filter),
the kept rows are summed in float64 into running sums. Nothing per prompt is kept beyond the
current batch. The
prompt prefix that every prompt shares runs once; its keys/values serve every batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refdir.data.prompts import check_prompts
from refdir.directions.candidates import Candidates
from refdir.directions.prompt_filter import filtered_out, refusal_filter
from refdir.errors import RefdirError
from refdir.model.chat import by_length
from refdir.model.chat_model import ChatModel
from refdir.model.hooks import hooked, residual_stream
from refdir.model.layout import model_signature
from refdir.model.prefix import SharedPrefix

__all__ = [
    "FilteredMeans",
    "extract_candidates",
    "filtered_means",
    "post_instruction_rows",
    "residual_means",
    "residual_rows",
]


Keep = Callable[[torch.Tensor], torch.Tensor]
"""Which prompts of a batch count, from their last-position logits [B, vocab]: bool [B]."""


@dataclass(frozen=True)
class FilteredMeans:
    """Mean residual stream [P, L+1, d] (float64, CPU) over the prompts kept, and which were."""

    mean: torch.Tensor
    kept: list[bool]


def filtered_means(
    cm: ChatModel,
    instructions: Sequence[str],
    keep: Keep | None = None,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "activations",
) -> FilteredMeans:
    """Mean residual stream at the post-instruction positions over the prompts that ``keep``
    accepts, decided from the last-position logits of the same pass (None: every prompt).

    A batch's activations wait until its logits are known, then only the kept rows are added to
    the running float64 sums."""
    instructions = check_prompts(instructions, "`instructions`")
    if not instructions:
        raise RefdirError("no prompts to take activations from")
    n_post, n_layers = cm.chat.n_post, cm.n_layers
    sums = torch.zeros(n_post, n_layers + 1, cm.d_model, dtype=torch.float64)
    pending: dict[int, torch.Tensor] = {}

    def hold(index: int, hidden: torch.Tensor) -> None:
        pending[index] = hidden[:, -n_post:].detach()

    rows = [cm.chat.token_ids(text) for text in instructions]
    kept = [False] * len(rows)
    # the prefix every prompt shares (system prompt, header) runs once, cut so that it never
    # reaches into the post-instruction positions (identical prompts)
    short = min(len(r) for r in rows) - n_post
    hooks = residual_stream(cm.layout.layers, hold)
    with torch.inference_mode():
        prefix = SharedPrefix.build(cm, rows, at_most=short)
        with hooked(hooks):
            for chunk in tqdm(
                by_length(rows, batch_size), desc=desc, disable=not progress, unit="batch"
            ):
                logits = prefix.logits(cm, [rows[i] for i in chunk])
                mask = torch.ones(len(chunk), dtype=torch.bool) if keep is None else keep(logits)
                for index, hidden in pending.items():
                    sums[:, index] += hidden[mask.to(hidden.device)].to("cpu", torch.float64).sum(0)
                pending.clear()
                for i, k in zip(chunk, mask.tolist(), strict=True):
                    kept[i] = bool(k)
    n_kept = sum(kept)
    return FilteredMeans(sums / max(n_kept, 1), kept)


def residual_means(
    cm: ChatModel,
    instructions: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "activations",
) -> torch.Tensor:
    """Mean residual stream [P, L+1, d] (float64, on CPU) at the post-instruction positions."""
    return filtered_means(cm, instructions, None, batch_size, progress, desc).mean


class _Enough(Exception):
    """Raised by a hook once the last layer asked for is read: the rest of the pass is skipped."""


def post_instruction_rows(
    cm: ChatModel,
    instructions: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    extra: str = "",
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "activations",
) -> torch.Tensor:
    """Each prompt's residual stream at post-instruction ``positions`` (negative, default every
    one) and at the input of ``layers`` (``n_layers``: the last layer's output; default every
    one), ``extra`` appended to each instruction (a suffix attack): float64 [N, P, L, d] on CPU,
    in the prompts' and the arguments' order. The pass stops once the deepest layer asked for
    is read, so one early layer costs a fraction of a forward pass."""
    instructions = check_prompts(instructions, "`instructions`")
    if not instructions:
        raise RefdirError("no prompts to take activations from")
    n_post = cm.chat.n_post
    wanted_positions = list(range(-n_post, 0)) if positions is None else list(positions)
    wanted_layers = list(range(cm.n_layers + 1)) if layers is None else list(layers)
    for position in wanted_positions:
        if not -n_post <= position <= -1:
            raise RefdirError(
                f"position {position} is not a post-instruction position (-{n_post}..-1)"
            )
    for layer in wanted_layers:
        if not 0 <= layer <= cm.n_layers:
            raise RefdirError(f"layer {layer} is outside 0..{cm.n_layers} for this model")
    if not wanted_positions or not wanted_layers:
        raise RefdirError("no layer or position to take activations at")
    slot = {layer: i for i, layer in enumerate(wanted_layers)}
    deepest = max(wanted_layers)
    at = torch.tensor(wanted_positions)
    rows = [cm.chat.token_ids(text, extra) for text in instructions]
    out = torch.zeros(
        len(rows), len(wanted_positions), len(wanted_layers), cm.d_model, dtype=torch.float64
    )
    current: list[int] = []

    def hold(index: int, hidden: torch.Tensor) -> None:
        if index in slot:
            picked = hidden[:, at.to(hidden.device)].detach().to("cpu", torch.float64)
            out[current, :, slot[index]] = picked
        if index == deepest:
            raise _Enough

    short = min(len(r) for r in rows) - n_post
    with torch.inference_mode():
        prefix = SharedPrefix.build(cm, rows, at_most=short)
        with hooked(residual_stream(cm.layout.layers, hold)):
            for chunk in tqdm(
                by_length(rows, batch_size), desc=desc, disable=not progress, unit="batch"
            ):
                current[:] = list(chunk)
                with contextlib.suppress(_Enough):
                    prefix.logits(cm, [rows[i] for i in chunk])
    return out


def residual_rows(
    cm: ChatModel,
    instructions: Sequence[str],
    position: int = -1,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "activations",
) -> torch.Tensor:
    """Each prompt's residual stream at one post-instruction ``position``, at every layer's input
    and the last layer's output: float64 [N, L+1, d] on CPU, in the prompts' order."""
    rows = post_instruction_rows(cm, instructions, None, [position], "", batch_size, progress, desc)
    return rows[:, 0]


def extract_candidates(
    cm: ChatModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
    harmful_name: str | None = None,
    harmless_name: str | None = None,
    refusal_tokens: Sequence[int] | None = None,
) -> Candidates:
    """Difference-of-means candidates for every post-instruction position and layer.

    With ``refusal_tokens``, the paper's filter runs in the same pass: a harmful prompt counts
    only if its refusal metric is > 0, a harmless one only if it is < 0; the candidates record
    the prompts kept."""
    harmful = check_prompts(harmful, "`harmful`")  # both, before either pass
    harmless = check_prompts(harmless, "`harmless`")

    def keeper(positive: bool) -> Keep | None:
        if refusal_tokens is None:
            return None
        tokens = list(refusal_tokens)
        return lambda logits: refusal_filter(logits, tokens, positive)

    means = {}
    for name, prompts, positive in (("harmful", harmful, True), ("harmless", harmless, False)):
        means[name] = filtered_means(
            cm, prompts, keeper(positive), batch_size, progress, f"{name} activations"
        )
        if not any(means[name].kept):
            set_name = harmful_name if positive else harmless_name
            raise filtered_out(set_name or name)
    kept = {
        name: [p for p, k in zip(prompts, means[name].kept, strict=True) if k]
        for name, prompts in (("harmful", harmful), ("harmless", harmless))
    }
    return Candidates(
        means["harmful"].mean,
        means["harmless"].mean,
        cm.name,
        cm.revision,
        harmful_name,
        harmless_name,
        len(kept["harmful"]),
        len(kept["harmless"]),
        kept["harmful"],
        kept["harmless"],
        model_signature(cm.layout),
    )
