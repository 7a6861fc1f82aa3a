"""The README.md of an export folder: a hub model card with YAML front matter (base_model,
tags, license where the base's is known), the method, where the direction came from, the run's
refusal and KL figures when it came from a run, the export's parity with hook ablation, and the
library versions that made it."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

from refdir.artifacts.export import ExportManifest
from refdir.artifacts.metrics import MetricsRecord
from refdir.artifacts.selection import SelectionRecord
from refdir.directions.direction import Direction
from refdir.errors import RefdirError

__all__ = ["CARD_FILE", "ORGANISM_BASE", "base_model_id", "card_license", "model_card"]

CARD_FILE = "README.md"
ORGANISM_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the bundled organism is tuned from."""

_LIBRARIES = ("refdir", "torch", "transformers", "safetensors", "peft", "gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(name: str) -> str | None:
    """The hub id of the model ``name`` names (the organism's base for ``organism``), or None
    for a local path or file."""
    if name == "organism":
        return ORGANISM_BASE
    if _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


def card_license(source: Path | None) -> str | None:
    """The license a local model folder's own card declares in its front matter, if any."""
    if source is None or not (source / CARD_FILE).is_file():
        return None
    text = source.joinpath(CARD_FILE).read_text(encoding="utf-8", errors="replace")
    front = re.match(r"^---\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*(\S+)\s*$", front.group(1), re.M) if front else None
    return found.group(1).strip("'\"") if found else None


def _versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _read(kind: type[MetricsRecord] | type[SelectionRecord], run: Path | None) -> object | None:
    if run is None or not (run / kind.FILE).is_file():
        return None
    try:
        return kind.read(run)
    except RefdirError:  # a damaged file of the run: the card goes without its figures
        return None


_USAGE = {
    "safetensors": """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```""",
    "lora": """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{folder}")  # or .merge_and_unload()
```

vLLM: `vllm serve {base} --enable-lora --lora-modules refdir={folder}`.""",
    "gguf": """```sh
llama-cli -m {folder}/{file} -cnv
```

Ollama: a `Modelfile` with `FROM ./{file}`, then `ollama create NAME -f Modelfile`.""",
}


def model_card(
    manifest: ExportManifest,
    direction: Direction,
    files: list[str],
    *,
    base_model: str | None = None,
    license_id: str | None = None,
    run: Path | None = None,
) -> str:
    """The card's text. ``files``: the export's model files (the first is named in the usage);
    ``run``: the run folder the direction came from (its selection and metrics are quoted)."""
    tags = ["refdir", "abliterated", "refusal-direction", manifest.kind]
    front = [f"base_model: {json.dumps(base_model)}"] if base_model else []
    if manifest.kind == "lora":
        front.append("library_name: peft")
    elif manifest.kind == "safetensors":
        front.append("library_name: transformers")
    if license_id:
        front.append(f"license: {json.dumps(license_id)}")
    front.append("tags:")
    front += [f"- {tag}" for tag in tags]
    method = (
        f"a weighted edit of rank {manifest.rank or 1} (refdir optimize)"
        if manifest.edit is not None
        else "weight orthogonalization against one refusal direction (Arditi et al., 2024)"
    )
    form = {
        "safetensors": "the edited checkpoint (safetensors)",
        "lora": f"a PEFT LoRA adapter of rank {manifest.rank} on the unedited base",
        "gguf": f"the edited model as GGUF ({manifest.gguf_type})",
    }[manifest.kind]
    lines = [
        "---",
        *front,
        "---",
        "",
        f"# {manifest.source_model}, refusal direction removed",
        "",
        f"Made with [refdir](https://pypi.org/project/refdir/): {method}, exported as {form}. "
        "Every weight that writes into the residual stream no longer writes along the "
        "direction, so the model no longer represents refusal there. It will answer requests "
        "it refused before; use it for research on refusal and safety, not to cause harm.",
        "",
        "## Direction",
        "",
        "| | |",
        "|---|---|",
        f"| model it was extracted from | `{direction.model}` |",
        f"| layer (residual input) | {direction.layer} |",
        f"| position (from the prompt's end) | {direction.position} |",
        f"| norm | {direction.norm:.4g} |",
    ]
    if direction.harmful or direction.harmless:
        lines.append(
            f"| prompt sets | {direction.harmful} ({direction.n_harmful}) vs "
            f"{direction.harmless} ({direction.n_harmless}) |"
        )
    if run is not None:
        lines.append(f"| run | `{run.name}` |")
    selection = _read(SelectionRecord, run)
    metrics = _read(MetricsRecord, run)
    if isinstance(selection, SelectionRecord) and selection.chosen is not None:
        chosen = selection.chosen
        lines += [
            f"| selection | {selection.rule}; bypass {_f(chosen.bypass)}, induce "
            f"{_f(chosen.induce)}, KL {_f(chosen.kl)} ({selection.n_passed} of "
            f"{selection.n_candidates} candidates passed) |",
        ]
    if isinstance(metrics, MetricsRecord):
        refusal = metrics.harmful.refusal_score
        lines += [
            "",
            "## Measured in the run (hook ablation)",
            "",
            "| | baseline | ablation | activation addition |",
            "|---|---|---|---|",
            f"| harmful refusal score | {refusal.baseline:.3f} | {refusal.ablation:.3f} | "
            f"{refusal.actadd:.3f} |",
            f"| harmless refusal score | {metrics.harmless.refusal_score.baseline:.3f} | | "
            f"{metrics.harmless.refusal_score.actadd:.3f} |",
            "",
            f"KL(baseline || ablation) on harmless prompts: "
            f"{metrics.harmless.kl_ablation:.4f} (mean, last position).",
        ]
    kind = "exact" if manifest.exact else "approximate"
    lines += [
        "",
        "## Parity with hook ablation",
        "",
        f"{kind.capitalize()} ({manifest.note}). Max |logit difference| against hook ablation "
        f"on probe prompts: {manifest.parity_max_abs_logit_delta:.3g} "
        f"({manifest.parity_dtype}).",
        "",
        "## Use",
        "",
        _USAGE[manifest.kind].format(
            folder=".",
            base=base_model or manifest.source_model,
            file=files[0] if files else "",
        ),
        "",
        "## Versions",
        "",
        ", ".join(f"{name} {version}" for name, version in _versions().items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
