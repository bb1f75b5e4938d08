"""Built-in tasks: the embedded arithmetic task and its character-level tokenizer."""

from gradflow.tasks.arithmetic import ArithmeticTask, generate, question_split, solve, task_prompt
from gradflow.tasks.tokenizer import build_tokenizer, save_tokenizer

__all__ = [
    "ArithmeticTask",
    "build_tokenizer",
    "generate",
    "question_split",
    "save_tokenizer",
    "solve",
    "task_prompt",
]
