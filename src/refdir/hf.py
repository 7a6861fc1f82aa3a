"""What refdir needs to know about transformers and the Hugging Face hub, in one place: the
keyword a key/value cache is passed under, a GGUF model's de-quantized state, and whether the
hub can be reached."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import torch
from huggingface_hub import constants, is_offline_mode
from transformers import PreTrainedModel

__all__ = [
    "cache_kwargs",
    "detach_gguf_quantizer",
    "hub_offline",
    "hub_reachable",
    "load_failure",
    "returned_cache",
]


def cache_kwargs(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands a key/value ``cache`` to ``module``'s forward (a model or
    a decoder layer): ``cache`` from transformers 5.24 on, ``past_key_values`` before it."""
    cls = type(module)
    if cls not in _CACHE_KEYWORD:
        parameters = inspect.signature(module.forward).parameters
        _CACHE_KEYWORD[cls] = "cache" if "cache" in parameters else "past_key_values"
    return {_CACHE_KEYWORD[cls]: cache}


_CACHE_KEYWORD: dict[type, str] = {}


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward returned (``cache``; ``past_key_values`` before 5.24), or
    None."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)


def detach_gguf_quantizer(model: PreTrainedModel) -> None:
    """transformers keeps its GGUF quantizer on a de-quantized model and then refuses
    ``save_pretrained``; the weights are plain tensors, so drop it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # type: ignore[assignment]
    for attr in ("is_quantized", "_is_quantized_training_enabled"):
        if getattr(model, attr, False) is True:
            with contextlib.suppress(AttributeError):
                setattr(model, attr, False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE=1``) for the duration."""
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection; assumed so behind
    a proxy, which this probe cannot see through, and never so in offline mode."""
    if is_offline_mode():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if url.hostname is None:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_failure(what: str, exc: BaseException) -> str:
    """The one-line message for a model or tokenizer that transformers could not load: its
    first line, or, for a model that needs code from its repository, how to allow that."""
    text = str(exc).strip()
    if "trust_remote_code" in text or "contains custom code" in text:
        return (
            f"{what} needs code from its repository to load, which refdir does not run unless "
            "asked; allow it with `trust_remote_code=True`, only for a model you trust"
        )
    reason = text.splitlines()[0] if text else type(exc).__name__
    return f"could not load {what}: {reason}; check the folder's files"
