"""refdir: find, test and edit the refusal direction of chat language models.

The public API, by stage of the paper's flow (each name lives in the folder of its stage):

* model: :func:`load_model`, :class:`ChatModel`, :class:`ModelOptions`, :class:`LayoutSpec`,
  :func:`generate`, :func:`last_position_logits`
* prompts: :func:`load_prompts`, :func:`sample_prompts`
* directions: :func:`extract_candidates`, :class:`Candidates`, :class:`Direction`,
  :func:`score_candidates`, :func:`pick`, :class:`SelectionConfig`
* interventions: :class:`Intervention`, :func:`ablate`, :func:`add`, :func:`orthogonalize`,
  :func:`export_orthogonalized`
* evaluation: :func:`evaluate_refusal`, :func:`monitor` (the direction as a monitor of prompts)
* the whole study: :class:`RunConfig`, :func:`run_pipeline`, :func:`write_report`,
  :func:`write_comparison`

The names are imported on first use, so that ``import refdir`` (and the command line's
``--help``) does not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from refdir.data import load_prompts, sample_prompts
    from refdir.directions.candidates import Candidates
    from refdir.directions.direction import Direction
    from refdir.directions.extraction import extract_candidates
    from refdir.directions.scoring import score_candidates
    from refdir.directions.selection import SelectionConfig, pick
    from refdir.errors import RefdirError
    from refdir.evaluation.monitor import monitor
    from refdir.evaluation.refusal import evaluate_refusal
    from refdir.interventions.export import export_orthogonalized
    from refdir.interventions.intervention import Intervention, ablate, add
    from refdir.interventions.orthogonalization import orthogonalize
    from refdir.model.chat_model import ChatModel
    from refdir.model.generation import generate, last_position_logits
    from refdir.model.layout_spec import LayoutSpec
    from refdir.model.loading import load_model
    from refdir.model.options import ModelOptions
    from refdir.report.compare import write_comparison
    from refdir.report.run_report import write_report
    from refdir.study.config import RunConfig
    from refdir.study.run import run_pipeline

__version__ = "0.2.0"

_SOURCES = {
    "load_model": "refdir.model.loading",
    "ChatModel": "refdir.model.chat_model",
    "ModelOptions": "refdir.model.options",
    "LayoutSpec": "refdir.model.layout_spec",
    "generate": "refdir.model.generation",
    "last_position_logits": "refdir.model.generation",
    "load_prompts": "refdir.data",
    "sample_prompts": "refdir.data",
    "extract_candidates": "refdir.directions.extraction",
    "Candidates": "refdir.directions.candidates",
    "Direction": "refdir.directions.direction",
    "score_candidates": "refdir.directions.scoring",
    "pick": "refdir.directions.selection",
    "SelectionConfig": "refdir.directions.selection",
    "Intervention": "refdir.interventions.intervention",
    "ablate": "refdir.interventions.intervention",
    "add": "refdir.interventions.intervention",
    "orthogonalize": "refdir.interventions.orthogonalization",
    "export_orthogonalized": "refdir.interventions.export",
    "evaluate_refusal": "refdir.evaluation.refusal",
    "monitor": "refdir.evaluation.monitor",
    "RunConfig": "refdir.study.config",
    "run_pipeline": "refdir.study.run",
    "write_report": "refdir.report.run_report",
    "write_comparison": "refdir.report.compare",
    "RefdirError": "refdir.errors",
}

__all__ = [
    "Candidates",
    "ChatModel",
    "Direction",
    "Intervention",
    "LayoutSpec",
    "ModelOptions",
    "RefdirError",
    "RunConfig",
    "SelectionConfig",
    "ablate",
    "add",
    "evaluate_refusal",
    "export_orthogonalized",
    "extract_candidates",
    "generate",
    "last_position_logits",
    "load_model",
    "load_prompts",
    "monitor",
    "orthogonalize",
    "pick",
    "run_pipeline",
    "sample_prompts",
    "score_candidates",
    "write_comparison",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        try:  # a subpackage or module: refdir.data, refdir.study, ... as with an eager __init__
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
