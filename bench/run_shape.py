"""`refdir run` on a random-weight model of a real shape: each step's wall time, and how much of
the machine's matrix-product rate each step's forward passes reach.

The model is ``--shape`` from ``bench/shapes.py`` (llama-3-8b by default) with random weights,
made on ``--device`` in ``--dtype`` (bfloat16 on a GPU), with ``--tokenizer``'s tokenizer. Its
refusals are noise, so the run takes the paper's Llama-3 refusal tokens ("I", "As"), skips the
prompt filter, and uses a hand-picked direction (last position, layer 0.6 L); it scores every
candidate of every layer (``score_all``: the paper's full sweep, since a random model's
negative induce scores would prune nearly all of the KL and bypass passes). Every other option
is ``refdir run``'s default: 128 + 128 training and 32 + 32 validation prompts, 152 + 100
held-out prompts, 64 greedy tokens, CE on 64 texts.

The baseline, measured in the same run: the rate of one large matrix product
(8192 x 8192 x 8192 on a GPU, 2048 on a CPU) in the model's dtype. For each step the script
counts the matrix-product FLOPs of the forward passes (2 x the weights of each linear layer
per token through it, padding included: the decoder layers' projections and the unembedding,
not the attention's score and value products, nor the layers an induce pass starts past) and
prints the rate reached as a fraction of that baseline.

    python bench/run_shape.py --tokenizer DIR [--shape llama-3-8b] [--device cuda]
                              [--dtype bfloat16] [--out DIR] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import refdir.study.run
from refdir.model.chat_model import ChatModel
from refdir.model.loading import resolve_dtype
from refdir.study.config import RunConfig
from refdir.study.run import run_pipeline
from refdir.study.state import Run
from shapes import SHAPES, random_chat_model, refusal_token_ids, sync

QUICK: dict[str, Any] = dict(
    n_train=16, n_val=8, n_eval_harmful=8, n_eval_harmless=8, n_ce=8, max_new_tokens=8
)


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of one square matrix product, the mean of a few after warm-ups."""
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    reps = 20 if device.startswith("cuda") else 3
    began = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - began)


class FlopCounter:
    """Matrix-product FLOPs of the linear layers inside the decoder layers and of the
    unembedding, from their inputs' shapes. The linear layers, not the decoder layers: a pass
    that starts at a layer (induce, and the CE of activation addition) replaces the forward of
    the layers below with an identity, and their hooks would still fire."""

    def __init__(self, cm: ChatModel) -> None:
        self.flops = 0.0
        self.handles = []
        linears = [m for layer in cm.layout.layers for m in layer.modules()]
        linears.append(cm.model.get_output_embeddings())
        for module in linears:
            if isinstance(module, torch.nn.Linear):
                self.handles.append(
                    module.register_forward_pre_hook(
                        self._count(module.weight.numel()), with_kwargs=True
                    )
                )

    def _count(self, weights: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            self.flops += 2.0 * weights * x.shape[:-1].numel()

        return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b", choices=tuple(SHAPES))
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: temporary)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, args.device)
    rate = matmul_rate(args.device, dtype)
    print(
        f"baseline: one large matrix product in {dtype} on {args.device}: {rate / 1e12:.1f} TFLOP/s"
    )
    cm = random_chat_model(args.shape, args.tokenizer, args.device, dtype)
    ids = tuple(refusal_token_ids(cm))
    config = RunConfig(
        model=cm.name,
        device=args.device,
        dtype=str(dtype).removeprefix("torch."),
        refusal_tokens=ids,
        filter_prompts=False,
        score_all=True,
        layer=int(0.6 * cm.n_layers),
        position=-1,
        **(QUICK if args.quick else {}),
    )
    counter = FlopCounter(cm)
    print(f"refdir run on random {args.shape} ({cm.n_layers} layers), {args.device}, {dtype}:")
    steps = []
    for entry in refdir.study.run.STEPS:

        def counted(
            run: Run, step: str = entry.name, fn: Callable[[Run], None] = entry.run
        ) -> None:
            before, began = counter.flops, time.perf_counter()
            fn(run)
            sync()
            seconds = time.perf_counter() - began
            tflop = (counter.flops - before) / 1e12
            print(  # as each step ends: a run cut short still says where its time went
                f"  {step:9s} {seconds:7.1f} s   {tflop:8.1f} TFLOP in forward passes   "
                f"{tflop / seconds:7.1f} TFLOP/s = {tflop * 1e12 / seconds / rate:.2f} of the "
                "baseline",
                flush=True,
            )

        steps.append(dataclasses.replace(entry, run=counted))
    # run_pipeline loops over refdir.study.run's own name for refdir.study.plan.STEPS: replace
    # that one (replacing plan.STEPS would leave the loop running the uncounted steps)
    refdir.study.run.STEPS = tuple(steps)
    out = args.out or Path(tempfile.mkdtemp(prefix="refdir-run-shape-"))
    began = time.perf_counter()
    run_pipeline(config, out, progress=False, model=cm)
    print(f"  total     {time.perf_counter() - began:7.1f} s (the steps; model made before)")
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"sizes: {json.dumps(metrics.get('sizes'))}")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
