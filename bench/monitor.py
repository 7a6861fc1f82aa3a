"""The monitor's cost per prompt: ``refdir.monitor`` (one forward pass, cut at the monitor's
layer, nothing generated) against what it replaces, measured in the same run on the same
prompts:

* a full forward pass to the last-position logits (what any classifier on the model's own
  output would need at least), and
* greedy generation of ``--tokens`` new tokens, then the refusal markers (what judging the
  model's answer needs).

Prints milliseconds per prompt of each and the ratios against the monitor. The model is the
bundled organism (``--model`` for another); ``--layer`` is the monitor's layer (default: the
direction's, here a random direction at two thirds of the depth).

    python bench/monitor.py [--model organism] [--n 64] [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import refdir
from refdir.data import sample_prompts
from refdir.directions.direction import Direction
from refdir.measures import is_refusal
from refdir.model.chat import by_length
from refdir.model.generation import generate
from refdir.model.loading import load_model
from refdir.model.prefix import SharedPrefix


def _timed(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """The best of ``repeats`` timed calls (after one untimed call, with ``warm_up``)."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cm = load_model(args.model)
    layer = args.layer if args.layer is not None else (2 * cm.n_layers) // 3
    direction = Direction(
        torch.randn(cm.d_model, generator=torch.Generator().manual_seed(0)), layer, -1, cm.name
    )
    prompts = sample_prompts("harmful_test", args.n, 0) + sample_prompts("harmless_test", args.n, 0)
    scorer = refdir.monitor(cm, direction, batch_size=args.batch_size)

    def full_pass() -> None:
        rows = [cm.chat.token_ids(p) for p in prompts]
        with torch.inference_mode():
            prefix = SharedPrefix.build(cm, rows, at_most=min(map(len, rows)) - cm.chat.n_post)
            for chunk in by_length(rows, args.batch_size):
                prefix.logits(cm, [rows[i] for i in chunk])

    def generation() -> None:
        texts = generate(cm, prompts, args.tokens, args.batch_size, progress=False)
        [is_refusal(t) for t in texts]

    n = len(prompts)
    monitor_s = _timed(lambda: scorer(prompts), args.repeats)
    full_s = _timed(full_pass, args.repeats)
    gen_s = _timed(generation, 1, warm_up=False)  # the model is warm by now
    print(f"{cm.name}: {cm.n_layers} layers, d={cm.d_model}; {n} prompts, batch {args.batch_size}")
    print(f"monitor at layer {layer}:     {1000 * monitor_s / n:8.2f} ms/prompt")
    print(
        f"full forward pass (logits): {1000 * full_s / n:8.2f} ms/prompt  "
        f"x{full_s / monitor_s:.2f} the monitor"
    )
    print(
        f"greedy {args.tokens} tokens + markers: {1000 * gen_s / n:8.2f} ms/prompt  "
        f"x{gen_s / monitor_s:.1f} the monitor"
    )


if __name__ == "__main__":
    main()
