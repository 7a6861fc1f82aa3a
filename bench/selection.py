"""Candidate scoring speed: refdir's scorer against a straightforward baseline, same run.

Model: random weights in SmolLM2-135M's shape (Llama, 30 layers, d=576, vocab 49152) with
SmolLM2's chat template and its default system prompt, so no download is needed. Scores the
candidates of a few layers (every post-instruction position) on n harmful + n harmless
prompts, and prints seconds per layer and the speed-up.

Baseline, the way a first implementation does it: one candidate at a time, full-vocabulary
logits at every position (``model(...).logits``), no reuse of the shared prompt prefix, and
separate ablated passes for bypass (harmful) and KL (harmless).

Then the induce passes alone, over layers spread across the depth: every pass from layer 0
against passes that start at the candidate's layer on recorded layer inputs.

Then the same induce passes (from the layer) with the (candidate, prompt) rows cut into batches
in prompt order, as before, against batches of prompts of similar length (what refdir does).

    python bench/selection.py [--layers 3] [--n 32] [--threads 2] [--only scorer|induce|batching]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence, Sized

import torch

import refdir.directions.scoring
from refdir.data import sample_prompts
from refdir.directions.direction import Direction
from refdir.directions.scoring import candidate_logits
from refdir.interventions.intervention import ablate, add
from refdir.model.chat_model import ChatModel
from refdir.model.layer_inputs import LayerInputs
from shapes import random_chat_model


def baseline(
    cm: ChatModel, harmful: list[str], harmless: list[str], vectors: torch.Tensor, layer: int
) -> None:
    def full_logits(prompts: list[str]) -> torch.Tensor:
        batch = cm.chat.encode(prompts)
        with torch.inference_mode():
            return cm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
                :, -1
            ]

    for v in vectors:
        direction = Direction(v, layer, -1, cm.name)
        with ablate(cm, direction):
            full_logits(harmful)
            full_logits(harmless)
        with add(cm, direction):
            full_logits(harmless)


def refdir_scorer(
    cm: ChatModel,
    harmful: list[str],
    harmless: list[str],
    vectors: torch.Tensor,
    layer: int,
    start: LayerInputs | None = None,
) -> None:
    candidate_logits(cm, [*harmful, *harmless], vectors, "ablate", batch_size=32)
    candidate_logits(cm, harmless, vectors, "actadd", layer, batch_size=32, start=start)


def induce_passes(
    cm: ChatModel,
    harmless: list[str],
    vectors: torch.Tensor,
    layers: list[int],
    start: bool,
    batch: int = 32,
) -> float:
    """Seconds for the induce passes of ``layers``, from layer 0 or from each layer."""
    began = time.perf_counter()
    recorded = (
        LayerInputs.record(cm, [cm.chat.token_ids(p) for p in harmless], batch) if start else None
    )
    for layer in layers:
        candidate_logits(cm, harmless, vectors, "actadd", layer, batch_size=batch, start=recorded)
    return time.perf_counter() - began


def in_prompt_order(rows: Sequence[Sized], size: int) -> list[list[int]]:
    """The batching before length sorting: consecutive rows, whatever their lengths."""
    return [list(range(i, min(i + size, len(rows)))) for i in range(0, len(rows), size)]


def batching(cm: ChatModel, harmless: list[str], layers: list[int], batch: int) -> None:
    vectors = torch.randn(cm.chat.n_post, cm.d_model)
    sorted_by_length = refdir.directions.scoring.by_length
    times = {}
    for name, chunker in (("prompt order", in_prompt_order), ("by length", sorted_by_length)):
        refdir.directions.scoring.by_length = chunker
        try:
            times[name] = induce_passes(cm, harmless, vectors, layers, start=True, batch=batch)
        finally:
            refdir.directions.scoring.by_length = sorted_by_length
    print(
        f"induce from the layer over layers {layers}, batch {batch}: prompt order "
        f"{times['prompt order']:.1f} s   by length {times['by length']:.1f} s   "
        f"speed-up x{times['prompt order'] / times['by length']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("scorer", "induce", "batching"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cm = random_chat_model("smollm2-135m")
    harmful = sample_prompts("harmful_val", args.n, 0)
    harmless = sample_prompts("harmless_val", args.n, 0)
    n_post = cm.chat.n_post
    print(
        f"model {cm.name}: {cm.n_layers} layers, {n_post} post-instruction positions, n={args.n}+{args.n}"
    )
    spread = list(range(1, cm.n_layers * 4 // 5, 4))
    if args.only in (None, "batching"):
        for batch in (32, 64):
            batching(cm, harmless, spread, batch)
    if args.only in (None, "induce"):
        # induce alone, over layers spread across the depth: every pass from layer 0, or passes
        # that start at the candidate's layer on the recorded layer inputs (what refdir does)
        vectors = torch.randn(n_post, cm.d_model)
        full = induce_passes(cm, harmless, vectors, spread, start=False)
        started = induce_passes(cm, harmless, vectors, spread, start=True)
        print(
            f"induce over layers {spread}: from layer 0 {full:.1f} s   from the layer "
            f"{started:.1f} s (recording included)   speed-up x{full / started:.2f}"
        )
    if args.only not in (None, "scorer"):
        return
    times = {"baseline": 0.0, "refdir": 0.0}
    for layer in range(10, 10 + args.layers):
        vectors = torch.randn(n_post, cm.d_model)
        for name, fn in (("baseline", baseline), ("refdir", refdir_scorer)):  # interleaved
            start = time.perf_counter()
            fn(cm, harmful, harmless, vectors, layer)
            times[name] += time.perf_counter() - start
    per_layer = {k: v / args.layers for k, v in times.items()}
    print(
        f"baseline {per_layer['baseline']:.1f} s/layer   refdir {per_layer['refdir']:.1f} s/layer   "
        f"speed-up x{per_layer['baseline'] / per_layer['refdir']:.2f}"
    )
    print(
        f"projected for {cm.n_layers * 4 // 5} layers (the paper's layer filter): "
        f"baseline {per_layer['baseline'] * 24 / 60:.1f} min, refdir {per_layer['refdir'] * 24 / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
