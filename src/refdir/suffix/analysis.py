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

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from refdir.chat import by_length
from refdir.direction import Direction, atomic_path, output_folder
from refdir.errors import RefdirError
from refdir.generation import generate, unsort
from refdir.hooks import Hook, hooked, residual_stream
from refdir.model import ChatModel
from refdir.scoring.markers import is_refusal
from refdir.stopwatch import Stopwatch, maybe
from refdir.suffix import (
    SUFFIX_JSON,
    SuffixConfig,
    SuffixResult,
    random_suffix_ids,
    search_suffix,
    suffix_text,
)

__all__ = [
    "ANALYSIS_JSON",
    "CONDITIONS",
    "REGIONS",
    "SuffixAnalysis",
    "analyze_suffix",
    "eager_attention",
    "head_geometry",
    "held_out_prompts",
    "run_suffix_experiment",
    "suffix_report_section",
]

ANALYSIS_JSON = "analysis.json"
CONDITIONS: tuple[str, ...] = ("alone", "adversarial", "random")
REGIONS: tuple[str, ...] = ("instruction", "suffix", "template")
COMPLETION_CHARS = 80
"""Stored completions (only when asked for) are cut to this many characters."""


@dataclass
class SuffixAnalysis:
    """Per-condition measurements; lists are JSON-ready (conditions first)."""

    model: str
    conditions: list[str]
    suffixes: dict[str, str]
    direction_layer: int
    direction_position: int
    prompts: list[str]
    projection: list[list[float]]
    """[C][L+1] mean projection onto the unit direction over prompts and post positions."""
    cosine: list[list[float]]
    """[C][L+1] mean cosine similarity with the direction."""
    projection_by_position: list[list[list[float]]]
    """[C][L+1][n_post] mean projection at each post-instruction position."""
    head_attribution: list[list[list[float | None]]]
    """[C][L][H] mean direct attribution of each head's output to the direction (last position;
    null in layers without attention)."""
    top_heads: list[list[int]]
    """[[layer, head], ...] by attribution in the ``alone`` condition."""
    attention_split: list[list[list[float]]]
    """[C][top][region] mean attention mass of the last position per region."""
    regions: list[str]
    refusal: dict[str, list[bool]]
    refusal_rate: dict[str, float]
    max_new_tokens: int
    completions: dict[str, list[str]] = field(default_factory=dict)
    """Empty unless asked for; each completion cut to ``COMPLETION_CHARS`` characters."""

    @property
    def n_layers(self) -> int:
        return len(self.projection[0]) - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / ANALYSIS_JSON
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SuffixAnalysis:
        path = Path(folder)
        path = path / ANALYSIS_JSON if path.is_dir() else path
        if not path.exists():
            raise RefdirError(f"{path} does not exist; run `refdir suffix` first")
        data = json.loads(path.read_text(encoding="utf-8"))
        names = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise RefdirError(f"{path} is not a refdir suffix analysis ({exc})") from None


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
    return [is_refusal(c) for c in completions], completions


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
    direction.check(cm.d_model, cm.n_layers)
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


# --------------------------------------------------------------------------- experiment + report


def run_suffix_experiment(
    cm: ChatModel,
    direction: Direction,
    out: str | Path,
    train_prompts: Sequence[str],
    eval_prompts: Sequence[str],
    config: SuffixConfig | None = None,
    *,
    eval_name: str = "custom",
    n_top: int = 6,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    keep_completions: bool = False,
    progress: bool = True,
    stopwatch: Stopwatch | None = None,
) -> dict[str, Any]:
    """Search a suffix on ``train_prompts``, analyse it on ``eval_prompts``, write everything to
    ``out`` (``suffix.json``, ``history.json``, ``analysis.json``, figures); returns suffix.json.
    ``stopwatch`` gets the time of the ``search`` and of the ``analysis`` (its completions and
    projections included)."""
    from refdir.suffix_figures import write_figures

    config = config or SuffixConfig()
    direction.check(cm.d_model, cm.n_layers)
    with output_folder(Path(out)) as folder:  # made and checked now, not after the search
        with maybe(stopwatch, "search"):
            result = search_suffix(cm, train_prompts, config, progress)
        random_ids = random_suffix_ids(cm, eval_prompts, len(result.token_ids), config.seed)
        random_text = suffix_text(cm, random_ids)
        with maybe(stopwatch, "analysis"):
            analysis = analyze_suffix(
                cm,
                direction,
                eval_prompts,
                result.suffix,
                random_text,
                n_top=n_top,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                keep_completions=keep_completions,
                progress=progress,
            )
        rates = analysis.refusal_rate
        extra = {
            "refusal_rate": {
                "without": rates["alone"],
                "with": rates["adversarial"],
                "random": rates["random"],
            },
            "random_suffix": random_text,
            "random_token_ids": random_ids,
            "eval_prompts": eval_name,
            "n_eval": len(eval_prompts),
            "direction": {"layer": direction.layer, "position": direction.position},
        }
        result.save(folder, extra)
        analysis.save(folder)
        write_figures(folder, analysis, result.history, result.best_history, result.objective)
        return {**result.summary(), **extra}


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _report_layers(n_layers: int, direction_layer: int) -> list[int]:
    picks = {0, n_layers // 4, n_layers // 2, direction_layer, (3 * n_layers) // 4, n_layers}
    return sorted(layer for layer in picks if 0 <= layer <= n_layers)


def suffix_report_section(folder: str | Path, relative_to: str | Path | None = None) -> str:
    """A markdown section on the suffix run in ``folder``; figures are linked by their path
    relative to ``relative_to`` (default: ``folder`` itself), e.g. the run folder of a report."""
    out = Path(folder)
    base = Path(relative_to) if relative_to is not None else out
    link = Path(os.path.relpath(out, base)).as_posix()
    pre = "" if link == "." else f"{link}/"
    summary = SuffixResult.load(out).summary()
    data = json.loads((out / SUFFIX_JSON).read_text(encoding="utf-8"))
    analysis = SuffixAnalysis.load(out)
    rates = data.get("refusal_rate", {})
    lines = [
        "## Adversarial suffix",
        "",
        f"A universal suffix of {len(summary['token_ids'])} tokens, searched by GCG on "
        f"{len(summary['instructions'])} harmful instructions in {summary['n_steps']} steps "
        f"({summary['seconds']:.0f} s; objective `{summary['objective']}` "
        f"{_fmt(summary['initial_loss'])} -> {_fmt(summary['loss'])}).",
        "",
        "| held-out prompts | refusal rate |",
        "|---|---|",
        f"| instruction alone | {_fmt(rates.get('without', float('nan')))} |",
        f"| + adversarial suffix | {_fmt(rates.get('with', float('nan')))} |",
        f"| + random suffix | {_fmt(rates.get('random', float('nan')))} |",
        "",
        f"Refusal rates by markers over {len(analysis.prompts)} prompts "
        f"(`{data.get('eval_prompts', '?')}`), greedy, {analysis.max_new_tokens} new tokens.",
        "",
        "Mean projection onto the refusal direction at the post-instruction tokens:",
        "",
        "| layer | " + " | ".join(analysis.conditions) + " |",
        "|---|" + "---|" * len(analysis.conditions),
    ]
    for layer in _report_layers(analysis.n_layers, analysis.direction_layer):
        cells = " | ".join(_fmt(row[layer]) for row in analysis.projection)
        mark = " (direction)" if layer == analysis.direction_layer else ""
        lines.append(f"| {layer}{mark} | {cells} |")
    lines += [
        "",
        "Attention of the last position, top heads (instruction / suffix / template):",
        "",
    ]
    lines += ["| head | " + " | ".join(analysis.conditions) + " |"]
    lines += ["|---|" + "---|" * len(analysis.conditions)]
    for t, (layer, head) in enumerate(analysis.top_heads):
        cells = " | ".join(
            " / ".join(f"{v:.2f}" for v in analysis.attention_split[c][t])
            for c in range(len(analysis.conditions))
        )
        lines.append(f"| L{layer}H{head} | {cells} |")
    lines += [
        "",
        f"![projection]({pre}projection.png) ![attention]({pre}attention.png) "
        f"![objective]({pre}objective.png)",
        "",
    ]
    return "\n".join(lines)


def held_out_prompts(name: str, n: int | None, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """Up to ``n`` prompts of a set (seeded sample) that are not in ``exclude``."""
    import random as _random

    from refdir.data import load_prompts

    banned = set(exclude)
    pool = [p for p in load_prompts(name) if p not in banned]
    if not pool:
        raise RefdirError(f"no held-out prompts left in {name} after removing the search set")
    if n is not None and n <= 0:
        raise RefdirError(f"--n-eval must be positive, got {n}")
    if n is None or n >= len(pool):
        return pool
    return _random.Random(seed).sample(pool, n)
