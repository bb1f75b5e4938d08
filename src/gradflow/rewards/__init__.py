"""Built-in reward functions (TRL's signature; `gradflow.rewards:NAME` in a config) and the
GSM8K answer extraction and grading they are built on."""

from gradflow.rewards.functions import (
    boxed_format,
    gsm8k_flexible,
    gsm8k_format,
    gsm8k_strict,
    math_verify,
    think_format,
)
from gradflow.rewards.gsm8k import (
    extract_answer,
    format_ok,
    is_correct,
    normalize_number,
    reference_answer,
)

__all__ = [
    "boxed_format",
    "extract_answer",
    "format_ok",
    "gsm8k_flexible",
    "gsm8k_format",
    "gsm8k_strict",
    "is_correct",
    "math_verify",
    "normalize_number",
    "reference_answer",
    "think_format",
]
