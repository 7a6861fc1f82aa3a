"""Refusal and safety scorers."""

from refdir.scoring.judges import JUDGES, Judge, JudgeFactory, LogitJudge, load_judge, safety_score
from refdir.scoring.markers import REFUSAL_MARKERS, is_refusal, refusal_rate
from refdir.scoring.registry import Registry

__all__ = [
    "JUDGES",
    "REFUSAL_MARKERS",
    "Judge",
    "JudgeFactory",
    "LogitJudge",
    "Registry",
    "is_refusal",
    "load_judge",
    "refusal_rate",
    "safety_score",
]
