"""How an adversarial suffix bypasses refusal, measured on held-out prompts (Arditi et al., 2024, §5).

Three conditions: the instruction alone, with the adversarial suffix, and with a random suffix of
the same token length. For each:

a) the projection (and cosine) of the residual stream onto the unit refusal direction at the
   post-instruction positions, at the input of every layer and the output of the last
   (``[conditions, L+1]``, and per position ``[conditions, L+1, n_post]``);
b) the direct attribution of every attention head to the direction at the last position: the
   head's slice of the attention output projection, ``W_O[:, h] @ z_h``, dotted with the unit
   direction (before any post-attention norm); for the top heads (largest mean attribution in the
   ``alone`` condition, in layers below the direction's layer) the attention mass of the last
   position on the instruction tokens, the suffix tokens and the template tokens;
c) the refusal rate (markers, greedy generation).

Attention probabilities come from the model's own eager attention (switched on for the capture
and restored after); per-head outputs from a pre-hook on the output projection. No weights change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from refdir.artifacts.suffix import SuffixAnalysis
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.model.chat import by_length
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate, unsort
from refdir.model.hooks import Hook, hooked, residual_stream
from refdir.model.thinking import score_completion

__all__ = [
    "CONDITIONS",
    "REGIONS",
    "analyze_suffix",
    "attention_parts",
    "eager_attention",
    "head_geometry",
]

CONDITIONS: tuple[str, ...] = ("alone", "adversarial", "random")
REGIONS: tuple[str, ...] = ("instruction", "suffix", "template")
COMPLETION_CHARS = 80
"""Stored completions (only when asked for) are cut to this many characters."""


# --------------------------------------------------------------------------- capture


def attention_parts(cm: ChatModel) -> list[tuple[nn.Module, nn.Module] | None]:
    """Each layer's (attention block, its output projection), whose heads the analysis reads;
    None for a layer whose token mixer is not attention (by its class name: the state-space,
    convolution and linear-attention layers of hybrid models). A one-line error for a model
    with no attention layer."""
    parts: list[tuple[nn.Module, nn.Module] | None] = []
    for part in cm.layout.per_layer:
        attn, out = part.attn, part.attn_out
        name = type(attn).__name__
        if attn is not None and out is not None and "Attention" in name and "Linear" not in name:
            parts.append((attn, out))
        else:
            parts.append(None)
    if not any(parts):
        raise RefdirError(
            f"{cm.name} has no attention layer found by its layout; the suffix analysis reads "
            "attention heads"
        )
    return parts


def head_geometry(cm: ChatModel) -> tuple[int, int]:
    """(number of query heads, head dimension) from the config and the output projection of
    the first attention layer."""
    config = cm.model.config.get_text_config()
    n_heads = getattr(config, "num_attention_heads", None)
    first = next(part for part in attention_parts(cm) if part is not None)
    weight = getattr(first[1], "weight", None)
    if not isinstance(n_heads, int) or not isinstance(weight, torch.Tensor):
        raise RefdirError("cannot find the number of attention heads in the model config")
    width = int(weight.shape[1])
    if width % n_heads:
        raise RefdirError(f"attention output width {width} is not a multiple of {n_heads} heads")
    return n_heads, width // n_heads


@contextmanager
def eager_attention(cm: ChatModel) -> Iterator[None]:
    """Switch the model to eager attention (which returns probabilities), then restore it."""
    config = cm.model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous == "eager" or previous is None:
        yield
        return
    try:
        cm.model.set_attn_implementation("eager")
    except (ValueError, ImportError) as exc:
        raise RefdirError(f"cannot switch {cm.name} to eager attention: {exc}") from None
    try:
        yield
    finally:
        cm.model.set_attn_implementation(previous)


@dataclass
class _Batch:
    """What one forward pass of one batch yields, all on CPU, float32."""

    projection: torch.Tensor  # [B, L+1, P]
    cosine: torch.Tensor  # [B, L+1, P]
    attribution: torch.Tensor  # [B, L, H]
    attention: torch.Tensor  # [B, L, H, 3]


def _spans(cm: ChatModel, instruction: str, extra: str) -> tuple[int, int, int, int]:
    """(template prefix, + instruction, + suffix, total) token counts of one prompt."""
    tok = cm.tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    prefix = count(cm.chat.prefix)
    head = count(cm.chat.prefix + instruction)
    full = count(cm.chat.prefix + instruction + extra) if extra else head
    return prefix, head, full, full + cm.chat.n_post


def _region_masks(
    cm: ChatModel, instructions: Sequence[str], extra: str, width: int
) -> torch.Tensor:
    """[B, K, 3] one-hot region of every key position (left padding belongs to no region)."""
    masks = torch.zeros(len(instructions), width, len(REGIONS))
    for row, text in enumerate(instructions):
        prefix, head, full, total = _spans(cm, text, extra)
        pad = width - total
        masks[row, pad:, 2] = 1.0
        masks[row, pad + prefix : pad + head, 0] = 1.0
        masks[row, pad + head : pad + full, 1] = 1.0
        masks[row, pad + prefix : pad + full, 2] = 0.0
    return masks


def _capture_hooks(
    cm: ChatModel, unit: torch.Tensor, store: dict[str, list[torch.Tensor]]
) -> list[Hook]:
    n_post, n_layers = cm.chat.n_post, cm.n_layers
    n_heads, head_dim = head_geometry(cm)
    store.update(  # layers without attention keep NaN
        resid=[torch.empty(0)] * (n_layers + 1),
        heads=[torch.full((1, n_heads, head_dim), math.nan)] * n_layers,
        attn=[torch.full((1, n_heads, 1), math.nan)] * n_layers,
    )

    def keep_resid(index: int, hidden: torch.Tensor) -> None:
        store["resid"][index] = hidden[:, -n_post:].detach().float().cpu()

    def o_proj_in(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            z = args[0][:, -1].detach().float().cpu()
            store["heads"][index] = z.view(z.shape[0], n_heads, head_dim)

        return hook

    def attn_out(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor):
                raise RefdirError(f"{cm.name} does not return attention probabilities")
            store["attn"][index] = weights[:, :, -1].detach().float().cpu()

        return hook

    hooks = residual_stream(cm.layout.layers, keep_resid)
    for i, part in enumerate(attention_parts(cm)):
        if part is not None:
            hooks.append((part[0], "output", attn_out(i)))
            hooks.append((part[1], "input", o_proj_in(i)))
    return hooks


def _head_write_directions(cm: ChatModel, unit: torch.Tensor) -> torch.Tensor:
    """[L, H, hd]: W_O[:, h]^T r, so a head's attribution is z_h . (W_O[:, h]^T r) (NaN in
    layers without attention)."""
    n_heads, head_dim = head_geometry(cm)
    rows = []
    for part in attention_parts(cm):
        if part is None:
            rows.append(torch.full((n_heads, head_dim), math.nan))
            continue
        weight = part[1].weight
        if not isinstance(weight, torch.Tensor):
            raise RefdirError("the attention output projection has no weight matrix")
        weight = weight.detach().float().cpu()
        rows.append((unit @ weight).view(n_heads, head_dim))
    return torch.stack(rows)


def _capture(cm: ChatModel, instructions: Sequence[str], extra: str, unit: torch.Tensor) -> _Batch:
    store: dict[str, list[torch.Tensor]] = {}
    hooks = _capture_hooks(cm, unit, store)
    batch = cm.chat.encode(instructions, extra).to(cm.device)
    with torch.inference_mode(), eager_attention(cm), hooked(hooks):
        cm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            logits_to_keep=1,
        )
    resid = torch.stack(store["resid"], 1)  # [B, L+1, P, d]
    projection = resid @ unit
    cosine = projection / resid.norm(dim=-1).clamp_min(1e-12)
    rows, width = len(instructions), max(a.shape[-1] for a in store["attn"])
    z = torch.stack([h.expand(rows, -1, -1) for h in store["heads"]], 1)  # [B, L, H, hd]
    attribution = (z * _head_write_directions(cm, unit)[None]).sum(-1)
    attn = torch.stack([a.expand(rows, -1, width) for a in store["attn"]], 1)  # [B, L, H, K]
    regions = _region_masks(cm, instructions, extra, attn.shape[-1])
    split = torch.einsum("blhk,bkr->blhr", attn, regions)
    return _Batch(projection, cosine, attribution, split)


def _measure(
    cm: ChatModel,
    instructions: Sequence[str],
    extra: str,
    unit: torch.Tensor,
    batch_size: int,
    progress: bool,
    desc: str,
) -> _Batch:
    chunks = by_length([cm.chat.token_ids(t, extra) for t in instructions], batch_size)
    parts = [
        _capture(cm, [instructions[i] for i in chunk], extra, unit)
        for chunk in tqdm(chunks, desc=desc, disable=not progress)
    ]
    fields = _Batch.__dataclass_fields__
    return _Batch(*(unsort([getattr(p, f) for p in parts], chunks) for f in fields))


# --------------------------------------------------------------------------- analysis


def _top_heads(attribution: torch.Tensor, max_layer: int, n_top: int) -> list[list[int]]:
    """[[layer, head]] of the largest mean attributions [L, H] in layers below ``max_layer``."""
    scores = attribution.nan_to_num(nan=-math.inf)  # layers without attention
    if 0 < max_layer < scores.shape[0]:
        scores[max_layer:] = float("-inf")
    flat = scores.flatten().topk(min(n_top, int(torch.isfinite(scores).sum()))).indices
    n_heads = scores.shape[1]
    return [[int(i) // n_heads, int(i) % n_heads] for i in flat]


def _refusals(
    cm: ChatModel,
    prompts: Sequence[str],
    extra: str,
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
) -> tuple[list[bool], list[str]]:
    completions = generate(cm, prompts, max_new_tokens, batch_size, progress, suffix=extra)
    opened = cm.chat.opens_reasoning
    return [score_completion(c, opened).refusal for c in completions], completions


def analyze_suffix(
    cm: ChatModel,
    direction: Direction,
    prompts: Sequence[str],
    adversarial: str,
    random: str,
    *,
    n_top: int = 6,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    keep_completions: bool = False,
    progress: bool = True,
) -> SuffixAnalysis:
    """Compare ``alone`` / ``adversarial`` / ``random`` suffix conditions on ``prompts``."""
    if not prompts:
        raise RefdirError("no prompts to analyse the suffix on")
    direction.fits(cm.layout)
    unit = direction.unit().cpu()
    suffixes = {"alone": "", "adversarial": adversarial, "random": random}
    measured = {
        c: _measure(cm, prompts, suffixes[c], unit, batch_size, progress, f"capture {c}")
        for c in CONDITIONS
    }
    attribution = torch.stack([measured[c].attribution.mean(0) for c in CONDITIONS])  # [C,L,H]
    top = _top_heads(attribution[0], direction.layer, n_top)
    split = torch.stack([measured[c].attention.mean(0) for c in CONDITIONS])  # [C,L,H,3]
    refusal: dict[str, list[bool]] = {}
    completions: dict[str, list[str]] = {}
    for c in CONDITIONS:
        flags, texts = _refusals(cm, prompts, suffixes[c], max_new_tokens, batch_size, progress)
        refusal[c] = flags
        if keep_completions:
            completions[c] = [t[:COMPLETION_CHARS] for t in texts]
    return SuffixAnalysis(
        model=cm.name,
        conditions=list(CONDITIONS),
        suffixes=suffixes,
        direction_layer=direction.layer,
        direction_position=direction.position,
        prompts=list(prompts),
        projection=torch.stack([measured[c].projection.mean((0, 2)) for c in CONDITIONS]).tolist(),
        cosine=torch.stack([measured[c].cosine.mean((0, 2)) for c in CONDITIONS]).tolist(),
        projection_by_position=torch.stack(
            [measured[c].projection.mean(0) for c in CONDITIONS]
        ).tolist(),
        head_attribution=[
            [[None if math.isnan(v) else v for v in heads] for heads in layers]
            for layers in attribution.tolist()
        ],
        top_heads=top,
        attention_split=[
            [split[ci, layer, head].tolist() for layer, head in top]
            for ci in range(len(CONDITIONS))
        ],
        regions=list(REGIONS),
        refusal=refusal,
        refusal_rate={c: sum(f) / len(f) for c, f in refusal.items()},
        max_new_tokens=max_new_tokens,
        completions=completions,
    )
