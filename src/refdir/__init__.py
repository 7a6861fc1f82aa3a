"""refdir: find, test and edit the refusal direction of chat language models.

The names below are imported on first use, so that ``import refdir`` (and the command line's
``--help``) does not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from refdir.activations import extract_candidates, residual_means
    from refdir.config import RunConfig
    from refdir.data import load_prompts, sample_prompts
    from refdir.direction import Candidates, Direction
    from refdir.errors import RefdirError
    from refdir.evaluate import evaluate_refusal
    from refdir.generation import generate, last_position_logits
    from refdir.intervene import ablate, add
    from refdir.layout import LayoutSpec, find_layout
    from refdir.model import ChatModel, load_model
    from refdir.orthogonalize import export_orthogonalized, orthogonalize
    from refdir.pipeline import run_pipeline
    from refdir.select import SelectionConfig, pick, score_candidates

__version__ = "0.1.0"

_SOURCES = {
    "extract_candidates": "refdir.activations",
    "residual_means": "refdir.activations",
    "load_prompts": "refdir.data",
    "sample_prompts": "refdir.data",
    "Candidates": "refdir.direction",
    "Direction": "refdir.direction",
    "RefdirError": "refdir.errors",
    "evaluate_refusal": "refdir.evaluate",
    "generate": "refdir.generation",
    "last_position_logits": "refdir.generation",
    "ablate": "refdir.intervene",
    "add": "refdir.intervene",
    "LayoutSpec": "refdir.layout",
    "find_layout": "refdir.layout",
    "ChatModel": "refdir.model",
    "load_model": "refdir.model",
    "export_orthogonalized": "refdir.orthogonalize",
    "orthogonalize": "refdir.orthogonalize",
    "RunConfig": "refdir.config",
    "run_pipeline": "refdir.pipeline",
    "SelectionConfig": "refdir.select",
    "pick": "refdir.select",
    "score_candidates": "refdir.select",
}

__all__ = [
    "Candidates",
    "ChatModel",
    "Direction",
    "LayoutSpec",
    "RefdirError",
    "RunConfig",
    "SelectionConfig",
    "ablate",
    "add",
    "evaluate_refusal",
    "export_orthogonalized",
    "extract_candidates",
    "find_layout",
    "generate",
    "last_position_logits",
    "load_model",
    "load_prompts",
    "orthogonalize",
    "pick",
    "residual_means",
    "run_pipeline",
    "sample_prompts",
    "score_candidates",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        try:  # a submodule: refdir.select, refdir.data, ... as with an eager __init__
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module 'refdir' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """The package keeps its exported functions when a submodule of the same name is first
    imported (``refdir.orthogonalize`` is the function, as with an eager ``__init__``; the
    module is ``sys.modules["refdir.orthogonalize"]``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SOURCES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
