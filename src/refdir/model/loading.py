"""Load a chat model (the bundled organism, a local folder, a GGUF file or a hub id) as a
:class:`~refdir.model.chat_model.ChatModel`, checked on the model itself."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from refdir.errors import RefdirError
from refdir.hf import detach_gguf_quantizer, hub_offline, hub_reachable, load_failure
from refdir.model.chat_model import ChatModel
from refdir.model.layout_check import verify_ablation
from refdir.model.layout_spec import LayoutSpec
from refdir.model.options import DTYPES, ModelOptions
from refdir.organism.load import load_organism

__all__ = [
    "ORGANISM",
    "load_model",
    "names_local_path",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

ORGANISM = "organism"
"""The bundled default model: SmolLM2-135M-Instruct safety-tuned by refdir (docs/organism.md)."""


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device != "cpu" else torch.float32
    if dtype not in DTYPES:
        raise RefdirError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    dtype_: torch.dtype = getattr(torch, DTYPES[dtype])
    return dtype_


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` (or ``cuda:N``), or ``auto`` (every visible GPU via device_map, else CPU)."""
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RefdirError(
            f"`device='{device}'` was asked for but no CUDA GPU is visible; use `device='cpu'`"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise RefdirError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    return device


def names_local_path(spec: str) -> bool:
    """Whether ``spec`` can only be a local path, never a hub id ("org/name")."""
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1


def _source(spec: str, gguf_file: str | None) -> tuple[str, str | None]:
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RefdirError(f"GGUF file {spec} does not exist")
        if gguf_file is not None:
            raise RefdirError(
                "give a GGUF file either as `model='FILE.gguf'` or as `model='FOLDER'` "
                "with `gguf_file='NAME'`, not both"
            )
        return str(path.parent), path.name
    if path.is_file():
        raise RefdirError(f"{spec} is a file but not a .gguf; give a model folder or a .gguf file")
    if names_local_path(spec) and not path.exists():
        raise RefdirError(f"no such model folder or file: {spec}; check the path")
    if gguf_file is not None:
        return spec, gguf_file
    if path.exists() and not (path / "config.json").exists() and not path.is_file():
        raise RefdirError(
            f"{spec} is a folder without config.json; point at a Hugging Face model folder"
        )
    return spec, None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_tokenizer_files(source: str, gguf: str | None) -> None:
    """A local model folder needs its tokenizer beside the weights (a GGUF file carries its own)."""
    folder = Path(source)
    if (
        gguf is None
        and folder.is_dir()
        and not any((folder / f).exists() for f in _TOKENIZER_FILES)
    ):
        raise RefdirError(
            f"{source} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the "
            "tokenizer into the folder with tokenizer.save_pretrained"
        )


def load_model(
    spec: str | ModelOptions = ORGANISM,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    system: str | None = None,
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    layout_spec: LayoutSpec | None = None,
) -> ChatModel:
    """Load ``spec``: ``organism`` (default), a local folder, a ``.gguf`` file or a hub id, or
    everything a :class:`~refdir.model.options.ModelOptions` names (then its fields stand for
    the keywords).

    The layout found by name is checked on the model before it is returned
    (:func:`~refdir.model.layout_check.verify_ablation`)."""
    if isinstance(spec, ModelOptions):
        options = spec
        return load_model(
            options.model,
            dtype=options.dtype,
            device=options.device,
            gguf_file=options.gguf_file,
            revision=revision,
            trust_remote_code=options.trust_remote_code,
            system=options.system,
            chat_template=options.chat_template,
            template_kwargs=options.template_options(),
            layout_spec=options.layout_spec(),
        )
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if spec == ORGANISM:
        if gguf_file is not None:
            raise RefdirError(
                "`gguf_file` names a file inside a model folder, not the organism; leave it unset"
            )
        model, tokenizer = load_organism(
            dtype=torch_dtype, device="cpu" if device == "auto" else device
        )
        revision = None
    else:
        model, tokenizer = _load_pretrained(
            spec, torch_dtype, device, gguf_file, revision, trust_remote_code
        )
    cm = ChatModel(
        model,
        tokenizer,
        name=spec,
        revision=revision,
        system=system,
        chat_template=chat_template,
        template_kwargs=dict(template_kwargs or {}),
        layout_spec=layout_spec,
    )
    return _verified(cm)


def _load_pretrained(
    spec: str,
    torch_dtype: torch.dtype,
    device: str,
    gguf_file: str | None,
    revision: str | None,
    trust_remote_code: bool,
) -> tuple[PreTrainedModel, Any]:
    """A local folder, a ``.gguf`` file or a hub id: the model on ``device`` and its tokenizer."""
    source, gguf = _source(spec, gguf_file)
    _check_tokenizer_files(source, gguf)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    unreachable = not Path(source).exists() and not hub_reachable()
    try:
        # an unreachable hub: the local cache only, not a minute of retries per file
        with hub_offline() if unreachable else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch_dtype,
                device_map="auto" if device == "auto" else None,
                **kwargs,
            )
    except Exception as exc:  # damaged weights raise library-specific errors of their own
        if unreachable and isinstance(exc, OSError):
            raise RefdirError(
                f"{spec!r} is not a local model folder, the Hugging Face hub cannot be reached "
                "from here, and it is not in the local cache; download it where there is a "
                f"network (hf download {spec}) or give a local folder"
            ) from None
        raise RefdirError(load_failure(f"model {spec!r}", exc)) from None
    if gguf is not None:
        detach_gguf_quantizer(model)
    if device not in ("auto", "cpu"):
        model.to(torch.device(device))  # type: ignore[arg-type]  # transformers stubs wrap .to
    log.info("loaded %s (%s, %s)", spec, torch_dtype, device)
    return model, tokenizer


def _verified(cm: ChatModel) -> ChatModel:
    """``cm``, once :func:`~refdir.model.layout_check.verify_ablation` has found that the layout
    it read covers everything that writes into the residual stream (three passes over two short
    prompts). ``REFDIR_SKIP_LAYOUT_CHECK=1`` skips the check, with a warning, for a model on
    which it misjudges rounding (its limits were set on random models)."""
    if os.environ.get("REFDIR_SKIP_LAYOUT_CHECK") == "1":
        log.warning("REFDIR_SKIP_LAYOUT_CHECK=1: %s's layout is not checked", cm.name)
        return cm
    try:
        verify_ablation(cm)
    except RefdirError as exc:
        raise RefdirError(
            f"{exc}; if the layout is right and this is rounding, REFDIR_SKIP_LAYOUT_CHECK=1 "
            "skips the check"
        ) from None
    return cm
