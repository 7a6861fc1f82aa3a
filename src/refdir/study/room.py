"""How large the files of refdir's longer commands will be, roughly, so that a full disk or the
process's file-size limit (``ulimit -f``) stops a command before its long work rather than at
its end (:func:`refdir.io.check_room`). The estimates err on the large side; the writes
themselves still fail with one line where an estimate was short."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.run import CANDIDATES, REPORT_HTML
from refdir.io import check_room
from refdir.model.chat_model import ChatModel
from refdir.model.loading import names_local_path
from refdir.study.config import RunConfig
from refdir.study.files import COMPLETIONS
from refdir.study.plan import STEP_NAMES
from refdir.study.steps.shared import eval_prompts, sampled_sets

__all__ = [
    "candidates_bytes",
    "check_run_room",
    "completions_bytes",
    "run_sizes",
]

BYTES_PER_TOKEN = 24
"""A generous bound on a generated token's length in a JSONL line (escaped non-ASCII text is
six bytes a character)."""

POST_BOUND = 16
"""Post-instruction positions assumed before the chat template is known (most have 4 to 6;
Qwen3's without thinking about 10)."""

REPORT_BYTES = 2_000_000
"""A bound on report.html, whose figures are inline."""

MARGIN = 2_000_000
"""The figures again (figures/), report.md, the small files (config, prompts, selection,
metrics, timings) and the file systems' rounding."""


def candidates_bytes(n_post: int, n_layers: int, d_model: int, prompts: Sequence[str]) -> int:
    """candidates.safetensors: the differences (float32) and both means (float64), each
    ``[n_post, n_layers + 1, d_model]``, and its metadata, which lists the prompts."""
    return n_post * (n_layers + 1) * d_model * (4 + 8 + 8) + len(json.dumps(list(prompts))) + 4096


def completions_bytes(prompts: Sequence[str], max_new_tokens: int) -> int:
    """A JSONL file of completions of ``prompts``: each line the prompt, at most
    ``max_new_tokens`` tokens and the refusal flag."""
    per_line = max_new_tokens * BYTES_PER_TOKEN + 64
    return sum(len(json.dumps(prompt)) + per_line for prompt in prompts)


def _model_dims(config: RunConfig, model: ChatModel | None) -> tuple[int, int, int] | None:
    """(post-instruction positions, layers, d_model) of the model a run will load: exact when
    it is given; else the layers and width from its config.json (a local folder, or a hub id
    already in the cache) with :data:`POST_BOUND` positions; None when neither is at hand."""
    if model is not None:
        return model.chat.n_post, model.n_layers, model.d_model
    spec, found = config.model, None
    if config.gguf_file is None and not spec.endswith(".gguf"):
        folder = Path(spec).expanduser()
        if (folder / "config.json").is_file():
            found = folder / "config.json"
        elif not names_local_path(spec) and spec.count("/") == 1:
            try:
                cached = try_to_load_from_cache(spec, "config.json")
            except ValueError:  # not a valid hub id: loading the model will say so
                cached = None
            found = Path(cached) if isinstance(cached, str) else None
    if found is None:
        return None
    try:
        fields = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fields = fields.get("text_config") or fields
    width = next((fields[k] for k in ("hidden_size", "n_embd", "d_model") if k in fields), None)
    depth = next(
        (fields[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in fields), None
    )
    if not isinstance(width, int) or not isinstance(depth, int):
        return None
    return POST_BOUND, depth, width


def run_sizes(
    config: RunConfig, out: Path, model: ChatModel | None = None, until: str | None = None
) -> dict[str, int]:
    """Estimates of the larger files a run still has to write into ``out`` (up to the step
    ``until``), by their names in the run folder: the candidates (when the model's size is
    known without loading it), the completions and report.html."""
    last = STEP_NAMES.index(until) if until in STEP_NAMES else len(STEP_NAMES)

    def due(step: str) -> bool:
        return STEP_NAMES.index(step) <= last

    sizes: dict[str, int] = {}
    dims = _model_dims(config, model) if due("extract") else None
    if dims is not None and not (out / CANDIDATES.FILE).exists():
        drawn = sampled_sets(config)
        sizes[CANDIDATES.FILE] = candidates_bytes(*dims, [*drawn[0], *drawn[1]])
    if due("evaluate") and not (out / MetricsRecord.FILE).exists():
        _, harmful, harmless = eval_prompts(config)
        n, long = config.max_new_tokens, config.long_tokens
        for name, conditions, prompts in (
            ("harmful", ("baseline", "ablation", "actadd"), harmful),
            ("harmless", ("baseline", "actadd", "ablation"), harmless),
            ("harmful", ("ablation_long",) if long > n else (), harmful),
        ):
            for condition in conditions:
                file = f"{Path(COMPLETIONS).parent}/{name}.{condition}.jsonl"
                tokens = long if condition == "ablation_long" else n
                if not (out / file).exists():
                    sizes[file] = completions_bytes(prompts, tokens)
    if due("report") and not (out / REPORT_HTML.FILE).exists():
        sizes[REPORT_HTML.FILE] = REPORT_BYTES
    return sizes


def check_run_room(
    config: RunConfig, out: Path, model: ChatModel | None = None, until: str | None = None
) -> None:
    """A one-line error before a run's work unless the files it still has to write
    (:func:`run_sizes`, and a margin) fit on the disk under ``out``, and the largest under the
    process's file-size limit."""
    sizes = run_sizes(config, out, model, until)
    if sizes:
        largest = max(sizes, key=lambda file: sizes[file])
        check_room(out, sum(sizes.values()) + MARGIN, (out / largest, sizes[largest]))
