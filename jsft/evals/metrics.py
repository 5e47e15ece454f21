"""Text metrics on generated outputs."""

from __future__ import annotations


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts agree up to leading, trailing and repeated whitespace."""
    return float(normalize_whitespace(prediction) == normalize_whitespace(reference))
