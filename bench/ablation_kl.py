"""Where the KL cost of ablating a run's direction comes from (not a speed benchmark).

Reads the direction of a ``refdir run`` folder and measures, on the run's held-out harmless
prompts (same sample: ``--n`` prompts of harmless_test with the run's seed), the KL score
(mean KL(baseline || ablated) at the last prompt position) of:

* the chosen direction, ablated everywhere (what ``harmless.kl_ablation`` reports);
* the same direction ablated in the un-tuned base model (organism runs only): how much of the
  cost the base model already pays, before any safety tuning;
* ``--random`` random unit directions (``refdir.select.random_direction_kl``): the baseline of
  this script, what removing a direction with no special role costs this model;
* the chosen direction ablated everywhere but the first k prompt positions (k = 1, the
  attention sink, and k = the shared chat-template prefix): how much of the cost comes from
  those positions.

Every KL is printed with its ratio to the median random direction, measured in the same run.

    python bench/ablation_kl.py --run runs/organism [--n 100] [--random 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from refdir.data import sample_prompts
from refdir.direction import Direction
from refdir.generation import last_position_logits, shared_prefix_len
from refdir.hooks import hooked, map_output
from refdir.metrics import kl_divergence
from refdir.model import ChatModel, load_model
from refdir.select import random_direction_kl


def project_after(unit: torch.Tensor, skip: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Project ``unit`` out of every position but the first ``skip`` (prompt passes only)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        c = xf @ unit.to(xf.device)
        c[:, :skip] = 0.0
        return (xf - c.unsqueeze(-1) * unit.to(xf.device)).to(x.dtype)

    return fn


def one_by_one(cm: ChatModel, prompts: list[str]) -> torch.Tensor:
    """Last-position logits, one unpadded prompt per pass (so column k is position k)."""
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([cm.chat.token_ids(p)], device=cm.device)
            out.append(cm.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().cpu())
    return torch.stack(out)


def kl_skipping(
    cm: ChatModel, prompts: list[str], base: torch.Tensor, unit: torch.Tensor, skip: int
) -> float:
    hooks = [
        (m, "output", map_output(project_after(unit, skip))) for m in cm.layout.residual_writers
    ]
    with hooked(hooks):
        ablated = one_by_one(cm, prompts)
    return float(kl_divergence(base, ablated).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a refdir run folder")
    parser.add_argument("--n", type=int, default=100, help="held-out harmless prompts")
    parser.add_argument("--random", type=int, default=16, help="random directions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = json.loads((args.run / "config.json").read_text())["options"]
    direction = Direction.load(args.run)
    cm = load_model(options["model"])
    prompts = sample_prompts(options["harmless_eval"], args.n, options["seed"])
    unit = (direction.vector.double() / direction.vector.double().norm()).float()
    base = one_by_one(cm, prompts)
    rows: list[tuple[str, float]] = []
    rows.append(("chosen direction, every position", kl_skipping(cm, prompts, base, unit, 0)))
    if options["model"] == "organism":
        from refdir.organism import load_base_smollm2

        model, tokenizer = load_base_smollm2()
        untuned = ChatModel(model, tokenizer, name="smollm2-base")
        same = all(untuned.chat.token_ids(p) == cm.chat.token_ids(p) for p in prompts)
        assert same, "the base model formats the prompts differently"
        untuned_base = one_by_one(untuned, prompts)
        rows.append(
            (
                "same direction, un-tuned base model",
                kl_skipping(untuned, prompts, untuned_base, unit, 0),
            )
        )
    batched = last_position_logits(cm, prompts)
    reference = random_direction_kl(
        cm, prompts, args.random, options["seed"], batched, progress=False
    )
    prefix = shared_prefix_len([cm.chat.token_ids(p) for p in prompts])
    for skip in sorted({1, prefix}):
        label = f"chosen, all but the first {skip} position{'s' if skip > 1 else ''}"
        rows.append((label, kl_skipping(cm, prompts, base, unit, skip)))
    median = float(reference.quantile(0.5))
    print(f"{args.n} harmless prompts, direction L{direction.layer} / {direction.position}")
    print(
        f"baseline: {args.random} random directions (seed {options['seed']}): median {median:.4f}, "
        f"10th-90th percentile {float(reference.quantile(0.1)):.4f}-{float(reference.quantile(0.9)):.4f}, "
        f"range {float(reference.min()):.4f}-{float(reference.max()):.4f}"
    )
    for label, value in rows:
        share = float((reference < value).double().mean())
        print(
            f"{label:42s} KL {value:.4f}  x{value / median:.2f} of the random median, "
            f"above {100 * share:.0f}% of them"
        )


if __name__ == "__main__":
    main()
