"""refdir: find, test and edit the refusal direction of chat language models."""

from refdir.activations import extract_candidates, residual_means
from refdir.data import load_prompts, sample_prompts
from refdir.direction import Candidates, Direction
from refdir.errors import RefdirError
from refdir.evaluate import evaluate_refusal
from refdir.generation import generate, last_position_logits
from refdir.intervene import ablate, add
from refdir.layout import LayoutSpec, find_layout
from refdir.model import ChatModel, load_model
from refdir.orthogonalize import export_orthogonalized, orthogonalize
from refdir.pipeline import RunConfig, run_pipeline
from refdir.select import SelectionConfig, pick, score_candidates

__version__ = "0.1.0"

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
