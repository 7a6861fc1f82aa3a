"""Refusal and safety scorers."""

from refdir.scoring.markers import REFUSAL_MARKERS, is_refusal, refusal_rate

__all__ = ["REFUSAL_MARKERS", "is_refusal", "refusal_rate"]
