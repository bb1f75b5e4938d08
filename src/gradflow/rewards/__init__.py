"""Reward functions: GSM8K answer matching (strict and flexible) and a format check."""

from gradflow.rewards.gsm8k import (
    extract_answer,
    format_ok,
    is_correct,
    normalize_number,
    reference_answer,
    safe_score,
)

__all__ = [
    "extract_answer",
    "format_ok",
    "is_correct",
    "normalize_number",
    "reference_answer",
    "safe_score",
]
