"""Where the KL cost of ablating a run's direction comes from (not a speed benchmark).

Reads the direction of a ``refdir run`` folder and measures, on the run's held-out harmless
prompts (the same sample: the run's harmless set, size and seed), the KL score (mean
KL(baseline || ablated) at the last prompt position) of:

* ``--random`` random unit directions (``refdir.evaluation.kl.random_direction_kl``): the baseline of
  this script, what removing a direction with no special role costs the model;
* the chosen direction, ablated everywhere (what ``harmless.kl_ablation`` reports), as a ratio
  to the random directions' median;
* the chosen direction ablated everywhere but the first k prompt positions (k = 1, the
  attention sink, and k = the shared chat-template prefix), as a share of the full cost;
* for organism runs, the same direction ablated in the un-tuned base model, against random
  directions in that model: how much of the cost the base model pays before any safety tuning.

The per-position measures run one unpadded prompt at a time (column k is position k).

    python bench/ablation_kl.py --run runs/organism [--random 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from refdir.data import sample_prompts
from refdir.directions.direction import Direction
from refdir.evaluation.kl import random_direction_kl
from refdir.measures import kl_divergence
from refdir.model.chat_model import ChatModel
from refdir.model.hooks import Hook, hooked, map_sites
from refdir.model.loading import load_model
from refdir.model.prefix import shared_prefix_len


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
    hooks: list[Hook] = map_sites(cm.layout.residual_writes, project_after(unit, skip))
    with hooked(hooks):
        ablated = one_by_one(cm, prompts)
    return float(kl_divergence(base, ablated).mean())


def reference_line(name: str, reference: torch.Tensor, seed: int) -> str:
    q = [float(reference.quantile(x)) for x in (0.5, 0.1, 0.9)]
    return (
        f"{name}: {len(reference)} random directions (seed {seed}): median {q[0]:.4f}, "
        f"10th-90th percentile {q[1]:.4f}-{q[2]:.4f}, "
        f"range {float(reference.min()):.4f}-{float(reference.max()):.4f}"
    )


def against(value: float, reference: torch.Tensor) -> str:
    share = float((reference < value).double().mean())
    median = float(reference.quantile(0.5))
    return f"x{value / median:.2f} of that model's random median, above {100 * share:.0f}% of them"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a refdir run folder")
    parser.add_argument("--random", type=int, default=16, help="random directions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = json.loads((args.run / "config.json").read_text())["options"]
    seed = options["seed"]
    direction = Direction.load(args.run)
    cm = load_model(options["model"])
    prompts = sample_prompts(options["harmless_eval"], options["n_eval_harmless"], seed)
    unit = (direction.vector.double() / direction.vector.double().norm()).float()
    print(f"{len(prompts)} harmless prompts, direction L{direction.layer} / {direction.position}")
    base = one_by_one(cm, prompts)
    reference = random_direction_kl(cm, prompts, args.random, seed, progress=False)
    print(reference_line(cm.name, reference, seed))
    full = kl_skipping(cm, prompts, base, unit, 0)
    print(f"  {'chosen direction, every position':52s} KL {full:.4f}  {against(full, reference)}")
    prefix = shared_prefix_len([cm.chat.token_ids(p) for p in prompts])
    for skip in sorted({1, prefix}):
        what = "the first" if skip == 1 else f"the {skip} of the shared template prefix"
        value = kl_skipping(cm, prompts, base, unit, skip)
        label = f"chosen, every position but {what}"
        print(f"  {label:52s} KL {value:.4f}  {100 * value / full:.0f}% of the full ablation's")
    if options["model"] == "organism":
        from refdir.organism.load import load_base_smollm2

        model, tokenizer = load_base_smollm2()
        untuned = ChatModel(model, tokenizer, name="un-tuned base")
        same = all(untuned.chat.token_ids(p) == cm.chat.token_ids(p) for p in prompts)
        assert same, "the base model formats the prompts differently"
        untuned_reference = random_direction_kl(untuned, prompts, args.random, seed, progress=False)
        print(reference_line(untuned.name, untuned_reference, seed))
        value = kl_skipping(untuned, prompts, one_by_one(untuned, prompts), unit, 0)
        label = "same direction, every position"
        print(f"  {label:52s} KL {value:.4f}  {against(value, untuned_reference)}")


if __name__ == "__main__":
    main()
