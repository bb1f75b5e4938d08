"""The embedded default task: procedurally generated arithmetic in the GSM8K answer format.

A question is a bare chain of additions and subtractions of small non-negative integers, and the
answer works it left to right, one step per line, ending in GSM8K's `#### N` line:

```
question:   41+17-25=?
prompt:     41+17-25=?\\n                      (task_prompt(question): what the model is fed)
completion: 41+17=58\\n58-25=33\\n#### 33<eos>   (Problem.answer, then the tokenizer's EOS)
```

The problems are small enough for a few-hundred-thousand-parameter transformer with a
character-level tokenizer (`gradflow.tasks.tokenizer`) to learn partially, so RL on a 2-core CPU
shows held-out accuracy climbing within minutes.

Train and test never share a question: a question's split is fixed by a stable hash of its text
(`question_split`), and `generate` rejects questions that belong to the other split.
"""

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gradflow.tasks.rows import Problem

_OPERATORS = "+-"
_TEST_BUCKETS = 10  # one hash bucket in ten is the test split


@dataclass(frozen=True)
class ArithmeticTask:
    """The knobs of the arithmetic task.

    **Arguments:**

    - `num_operands`: inclusive range `(low, high)` of the number of operands per question, drawn
        uniformly before rejection (so with `allow_negative=False` longer chains are somewhat
        rarer; de-duplication thins the small two-operand space further: 43% two-operand questions
        in a 20,000-question train split at the defaults); `low >= 2`.
    - `max_value`: operands are drawn uniformly from `0 .. max_value`.
    - `operators`: the operators to draw from, uniformly: a non-empty subset of `"+-"`
        (`"+"` alone gives an easier task).
    - `allow_negative`: whether a running result (and so the answer) may go below zero; when
        `False`, questions whose chain dips below zero are rejected.
    - `max_chars`: the cap on `len(task_prompt(question)) + len(answer)`; longer problems are
        rejected. The defaults never exceed 40 characters (41 tokens with EOS).
    """

    num_operands: tuple[int, int] = (2, 3)
    max_value: int = 99
    operators: str = "+-"
    allow_negative: bool = False
    max_chars: int = 48

    def __post_init__(self):
        low, high = self.num_operands
        if not 2 <= low <= high:
            raise ValueError(f"num_operands must satisfy 2 <= low <= high, got {self.num_operands}")
        if self.max_value < 1:
            raise ValueError(f"max_value must be >= 1, got {self.max_value}")
        if (
            not self.operators
            or len(set(self.operators)) != len(self.operators)
            or not set(self.operators) <= set(_OPERATORS)
        ):
            raise ValueError(
                f"operators must be distinct characters from {_OPERATORS!r}, got {self.operators!r}"
            )
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")


def task_prompt(question: str) -> str:
    """The text fed to the model for a question: the question followed by a newline.

    The model should complete it with the problem's `answer` followed by the EOS token.

    **Arguments:**

    - `question`: a question, e.g. `"41+17-25=?"`.

    **Returns:**

    The prompt, e.g. `"41+17-25=?\\n"`.
    """
    return question + "\n"


def _parse(question: str) -> tuple[list[int], list[str]]:
    """Split a question `"a+b-c=?"` into operands `[a, b, c]` and operators `["+", "-"]`."""
    expression = question.strip()
    if not expression.endswith("=?"):
        raise ValueError(f"not an arithmetic question (no trailing '=?'): {question!r}")
    expression = expression[:-2]
    operands: list[int] = []
    operators: list[str] = []
    digits = ""
    for char in expression:
        if "0" <= char <= "9":
            digits += char
        elif char in _OPERATORS and digits:
            operands.append(int(digits))
            operators.append(char)
            digits = ""
        else:
            raise ValueError(f"unexpected {char!r} in arithmetic question {question!r}")
    if not digits:
        raise ValueError(f"arithmetic question ends without an operand: {question!r}")
    operands.append(int(digits))
    return operands, operators


def _apply(left: int, operator: str, right: int) -> int:
    return left + right if operator == "+" else left - right


def solve(question: str) -> int:
    """Recompute a question's answer by parsing it (left to right; no `eval`).

    **Arguments:**

    - `question`: a question such as `"41+17-25=?"` (surrounding whitespace is ignored).

    **Returns:**

    The integer value of the expression, e.g. `33`.

    **Raises:**

    `ValueError` if the question is not a chain of non-negative integers joined by `+`/`-` and
    ending in `=?`.
    """
    operands, operators = _parse(question)
    result = operands[0]
    for operator, operand in zip(operators, operands[1:], strict=True):
        result = _apply(result, operator, operand)
    return result


def question_split(question: str) -> Literal["train", "test"]:
    """The split a question belongs to, from a stable hash of its text.

    **Arguments:**

    - `question`: the question string.

    **Returns:**

    `"test"` for one hash bucket in ten (SHA-256 of the UTF-8 text), `"train"` otherwise.
    """
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % _TEST_BUCKETS == 0 else "train"


def _worked(operands: list[int], operators: list[str]) -> tuple[str, bool]:
    """The worked answer, and whether any running result went below zero."""
    lines = []
    result = operands[0]
    negative = False
    for operator, operand in zip(operators, operands[1:], strict=True):
        new = _apply(result, operator, operand)
        lines.append(f"{result}{operator}{operand}={new}")
        negative = negative or new < 0
        result = new
    lines.append(f"#### {result}")
    return "\n".join(lines), negative


def generate(
    task: ArithmeticTask, n: int, *, seed: int, split: Literal["train", "test"]
) -> list[Problem]:
    """Generate `n` distinct problems of one split, deterministically from a seed.

    Questions are drawn from a `numpy.random.default_rng(seed)` stream; a draw is rejected if it
    belongs to the other split (`question_split`), repeats an earlier question, goes below zero
    (unless `task.allow_negative`), or is longer than `task.max_chars`.

    **Arguments:**

    - `task`: the task's knobs.
    - `n`: the number of problems.
    - `seed`: the seed; the same `(task, n, seed, split)` gives the same list.
    - `split`: `"train"` or `"test"`; the two never share a question.

    **Returns:**

    A list of `n` `Problem`s whose `answer` is the worked chain ending in `#### N`.

    **Raises:**

    `ValueError` if `n` distinct problems cannot be found within `1000 + 100 * n` draws (the task's
    question space is too small for `n`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    low, high = task.num_operands
    seen: set[str] = set()
    problems: list[Problem] = []
    max_draws = 1000 + 100 * n
    for _ in range(max_draws):
        if len(problems) == n:
            break
        count = int(rng.integers(low, high + 1))
        operands = [int(x) for x in rng.integers(0, task.max_value + 1, size=count)]
        operators = [
            task.operators[int(i)] for i in rng.integers(len(task.operators), size=count - 1)
        ]
        question = "".join(
            f"{operand}{operator}" for operand, operator in zip(operands, operators, strict=False)
        )
        question += f"{operands[-1]}=?"
        if question in seen or question_split(question) != split:
            continue
        answer, negative = _worked(operands, operators)
        if (negative and not task.allow_negative) or (
            len(task_prompt(question)) + len(answer) > task.max_chars
        ):
            continue
        seen.add(question)
        problems.append(Problem(question=question, answer=answer))
    if len(problems) < n:
        raise ValueError(
            f"found only {len(problems)} of {n} distinct {split!r} problems in {max_draws} draws; "
            f"the question space of {task} is too small"
        )
    return problems
