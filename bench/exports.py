"""The export formats on the organism: file sizes, parity with hook ablation, and the GGUF
export's refusal rate loaded back by transformers.

For each format (safetensors, a LoRA adapter on the unedited base, GGUF in F32, F16, Q8_0 and
the input's own types) the organism is orthogonalized against a direction and exported; the
export is loaded back (the adapter with PEFT, unmerged; a GGUF with transformers'
``gguf_file``) and compared with hook ablation on the unedited organism:

* max |delta logit| over every position of 32 chat-formatted prompts (16 harmful_test, 16
  harmless_test), float32;
* how many of the 32 prompts' greedy completions equal hook ablation's, token for token;
* for the GGUF exports (``--refusal-formats``), the refusal rate (by markers) on
  ``--n-refusal`` harmful_test prompts next to hook ablation's.

Not a timing. Completions are compared, never printed.

    python bench/exports.py --direction runs/organism [--n-refusal 100] [--tokens 64]
        [--formats "safetensors,lora,gguf F32"] [--refusal-formats "gguf F32"]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

from refdir.cli.work.orthogonalize import gguf_source
from refdir.data import sample_prompts
from refdir.directions.direction import Direction
from refdir.interventions.export import ExportOptions, export_orthogonalized
from refdir.interventions.intervention import ablate
from refdir.interventions.orthogonalization import last_logits, logit_delta
from refdir.measures import is_refusal
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions

FORMATS: list[tuple[str, str, str]] = [
    ("safetensors", "safetensors", "F16"),
    ("lora", "lora", "F16"),
    ("gguf F32", "gguf", "F32"),
    ("gguf F16", "gguf", "F16"),
    ("gguf Q8_0", "gguf", "Q8_0"),
    ("gguf source (Q4_1, Q8_0)", "gguf", "source"),
]


def _model_files(folder: Path) -> int:
    names = ("model.safetensors", "adapter_model.safetensors")
    return sum(p.stat().st_size for p in folder.iterdir() if p.name in names or p.suffix == ".gguf")


def _loader(folder: Path, kind: str) -> Callable[[], ChatModel]:
    def load() -> ChatModel:
        if kind == "lora":
            cm = load_model("organism", dtype="float32")
            cm.model = PeftModel.from_pretrained(cm.model, folder)  # type: ignore[assignment]
            return cm
        if kind == "gguf":
            (file,) = folder.glob("*.gguf")
            return load_model(str(file), dtype="float32")
        return load_model(str(folder), dtype="float32")

    return load


def _refusal(cm: ChatModel, prompts: list[str], tokens: int) -> float:
    texts = generate(cm, prompts, tokens, batch_size=32, progress=False)
    return sum(is_refusal(t) for t in texts) / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direction", type=Path, required=True)
    parser.add_argument("--n-refusal", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--formats",
        default=",".join(label for label, _, _ in FORMATS),
        help="labels of the formats to measure, comma-separated",
    )
    parser.add_argument(
        "--refusal-formats",
        default="gguf F32,gguf source (Q4_1, Q8_0)",
        help="the formats whose refusal rate is measured (GGUF ones), comma-separated",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [f.strip() for f in args.formats.split(",")]
    refusal_of = {f.strip() for f in args.refusal_formats.split(",")}
    direction = Direction.load(args.direction)
    probes = sample_prompts("harmful_test", 16, seed=0) + sample_prompts(
        "harmless_test", 16, seed=0
    )
    harmful = sample_prompts("harmful_test", args.n_refusal, seed=1)

    cm = load_model("organism", dtype="float32")
    with ablate(cm, direction):
        hooked_logits = last_logits(cm, probes)
        hooked_texts = generate(cm, probes, args.tokens, batch_size=32, progress=False)
        hooked_refusal = _refusal(cm, harmful, args.tokens)
    plain_refusal = _refusal(cm, harmful, args.tokens)
    mask = cm.chat.encode(probes).attention_mask
    del cm
    print(
        f"direction: layer {direction.layer}, position {direction.position}; refusal on "
        f"{args.n_refusal} harmful_test prompts ({args.tokens} tokens): no intervention "
        f"{plain_refusal:.2f}, hook ablation {hooked_refusal:.2f}"
    )
    print(
        f"{'format':26s} {'model files':>12s} {'export s':>9s} {'max |dlogit|':>13s} "
        f"{'same greedy':>12s} {'refusal':>8s}"
    )
    source = gguf_source(ModelOptions())
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind, gguf_type in FORMATS:
            if label not in chosen:
                continue
            folder = Path(tmp) / label.split()[0] / gguf_type
            folder.parent.mkdir(parents=True, exist_ok=True)
            cm = load_model("organism", dtype="float32")
            start = time.perf_counter()
            export_orthogonalized(
                cm,
                direction,
                folder,
                ExportOptions(kind, gguf_type, source),  # type: ignore[arg-type]
            )
            seconds = time.perf_counter() - start
            del cm
            gc.collect()
            loaded = _loader(folder, kind)()
            delta, _ = logit_delta(mask, hooked_logits, last_logits(loaded, probes))
            texts = generate(loaded, probes, args.tokens, batch_size=32, progress=False)
            same = sum(a == b for a, b in zip(texts, hooked_texts, strict=True))
            measured = label in refusal_of
            refusal = f"{_refusal(loaded, harmful, args.tokens):.2f}" if measured else ""
            print(
                f"{label:26s} {_model_files(folder) / 1e6:10.2f}MB {seconds:9.1f} "
                f"{delta:13.2e} {same:>9d}/32 {refusal:>8s}",
                flush=True,
            )
            del loaded
            gc.collect()


if __name__ == "__main__":
    main()
