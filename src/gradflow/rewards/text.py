"""Python reward functions over decoded text, turned into a host scorer for `HostReward`.

A reward function has the simple signature `fn(completion: str, reference: str) -> float`.
Each one runs under `safe_score`: one that raises or returns NaN scores 0 for that sample, is
counted in the `failed` part, and never kills the run.
"""

from collections.abc import Callable, Sequence

import numpy as np

from ..data import Problem
from .gsm8k import format_ok, is_correct, safe_score

TextReward = Callable[[str, str], float]


def correctness(mode: str) -> TextReward:
    """`1.0` when the completion's final answer matches the reference (GSM8K matching).

    **Arguments:**

    - `mode`: `"strict"` (only `#### N`) or `"flexible"`.

    **Returns:**

    The reward function.
    """

    def correct(completion: str, reference: str) -> float:
        return float(is_correct(completion, reference, mode=mode))

    return correct


def format_reward(completion: str, reference: str) -> float:
    """`1.0` when the completion ends its answer with a well-formed `#### N` line.

    **Arguments:**

    - `completion`: the decoded completion.
    - `reference`: unused (the signature every reward function has).

    **Returns:**

    The reward.
    """
    return float(format_ok(completion))


def text_scorer(
    tokenizer, problems: Sequence[Problem], functions: dict[str, TextReward]
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """A host scorer: decodes completions and applies each reward function.

    **Arguments:**

    - `tokenizer`: decodes completion tokens.
    - `problems`: the problem list that prompt indices point into.
    - `functions`: part name → reward function.

    **Returns:**

    `scorer(tokens, mask, prompt_index) -> float32 [len(functions) + 1, batch]`; the last row
    (`failed`) counts the reward functions that failed on each sample.
    """
    names = list(functions)

    def scorer(tokens: np.ndarray, mask: np.ndarray, index: np.ndarray) -> np.ndarray:
        out = np.zeros((len(names) + 1, tokens.shape[0]), np.float32)
        for row in range(tokens.shape[0]):
            text = tokenizer.decode(tokens[row][mask[row]], skip_special_tokens=True)
            reference = problems[int(index[row])].answer
            for part, name in enumerate(names):
                value, ok = safe_score(functions[name], text, reference)
                out[part, row] = value
                out[-1, row] += 0.0 if ok else 1.0
        return out

    return scorer
