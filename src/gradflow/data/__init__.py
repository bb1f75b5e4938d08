"""Data sets: problems with reference answers."""

from gradflow.data.errors import DataError
from gradflow.data.gsm8k import Problem, load_gsm8k, load_jsonl_problems

__all__ = ["DataError", "Problem", "load_gsm8k", "load_jsonl_problems"]
