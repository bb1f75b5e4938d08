"""Built-in reward functions with TRL's signature:
`fn(prompts, completions, completion_ids, *, answer, **columns) -> list[float | None]`.

Each takes the reference as the keyword `answer` (gradflow passes the `task.answer_key` column
under that name as well as its own) and returns one value per completion, `None` where the
reference itself cannot be graded. Name them in a config as `gradflow.rewards:NAME`.

A function may carry `vote_key(text) -> hashable | None`, the answer a completion gives, which
evaluation uses for maj@k (completions vote for the answer they give).
"""

import re
import threading
from collections.abc import Sequence

from gradflow.rewards.completions import completion_texts
from gradflow.rewards.gsm8k import (
    answer_value,
    boxed_contents,
    extract_answer,
    format_ok,
    is_correct,
    reference_answer,
)


def _gsm8k(mode: str, completions: Sequence, answer: Sequence[str]) -> list[float | None]:
    out: list[float | None] = []
    for text, reference in zip(completion_texts(completions), answer, strict=True):
        try:
            reference_answer(str(reference))
        except ValueError:
            out.append(None)
            continue
        out.append(float(is_correct(text, str(reference), mode=mode)))
    return out


def gsm8k_strict(prompts, completions, completion_ids=None, *, answer, **columns) -> list:
    """1 when the number after the completion's last `####` equals the reference's.

    **Arguments:**

    - `prompts`, `completion_ids`, `columns`: unused (TRL's signature).
    - `completions`: the completions.
    - `answer`: the references (a GSM8K solution ending in `#### N`, or a bare number).

    **Returns:**

    1.0 / 0.0 per completion; `None` where the reference holds no number.
    """
    return _gsm8k("strict", completions, answer)


def gsm8k_flexible(prompts, completions, completion_ids=None, *, answer, **columns) -> list:
    """1 when the completion's final answer (`####`, `\\boxed{}`, `<answer>`, "the answer is",
    else the last number) equals the reference's.

    **Arguments:**

    - `prompts`, `completion_ids`, `columns`: unused (TRL's signature).
    - `completions`: the completions.
    - `answer`: the references.

    **Returns:**

    1.0 / 0.0 per completion; `None` where the reference holds no number.
    """
    return _gsm8k("flexible", completions, answer)


def gsm8k_format(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1 when the completion has a well-formed `#### N` line.

    **Arguments:**

    - `prompts`, `completion_ids`, `columns`: unused (TRL's signature).
    - `completions`: the completions.

    **Returns:**

    1.0 / 0.0 per completion.
    """
    return [float(format_ok(text)) for text in completion_texts(completions)]


def _gsm8k_vote(text: str):
    answer = extract_answer(text, mode="strict")
    return None if answer is None else answer_value(answer)


gsm8k_strict.vote_key = _gsm8k_vote


def boxed_format(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1 when the completion holds exactly one well-formed (brace-balanced, non-empty)
    `\\boxed{...}`.

    **Arguments:**

    - `prompts`, `completion_ids`, `columns`: unused (TRL's signature).
    - `completions`: the completions.

    **Returns:**

    1.0 / 0.0 per completion.
    """
    out = []
    for text in completion_texts(completions):
        starts = [m.end() for m in re.finditer(r"\\boxed\s*\{", text)]
        ok = len(starts) == 1 and _balanced_content(text, starts[0]) not in (None, "")
        out.append(float(ok))
    return out


def _balanced_content(text: str, start: int) -> str | None:
    """The text from `start` up to its matching closing brace, or `None` when it is unclosed."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip()
    return None


def think_format(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1 when the completion is `<think>...</think>` (non-empty, not nested) followed by a
    non-empty answer, with no other think tags.

    **Arguments:**

    - `prompts`, `completion_ids`, `columns`: unused (TRL's signature).
    - `completions`: the completions.

    **Returns:**

    1.0 / 0.0 per completion.
    """
    return [float(_think_ok(text)) for text in completion_texts(completions)]


def _think_ok(text: str) -> bool:
    text = text.strip()
    if not text.startswith("<think>") or text.count("<think>") != 1:
        return False
    thought, closed, answer = text[len("<think>") :].partition("</think>")
    return bool(closed) and "</think>" not in answer and bool(thought.strip() and answer.strip())


def _timeouts() -> tuple[dict, dict]:
    """math-verify's own timeouts use SIGALRM, which only the main thread may set: elsewhere
    (gradflow's in-process scoring) they are off, and the worker pool's timeout applies."""
    on = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": 5 if on else None}, {"timeout_seconds": 5 if on else None}


def _parse_reference(reference: str):
    """A reference is LaTeX: a bare one (`(1, 2)`, `2\\pi`) is read as `$...$`, so that it is
    not cut to its first number."""
    from math_verify import parse

    parse_timeout, _ = _timeouts()
    if "$" in reference or "\\boxed" in reference:
        return parse(reference, **parse_timeout)
    return parse(f"${reference}$", **parse_timeout) if reference.strip() else []


def _parse_completion(text: str):
    """The completion's answer: its last `\\boxed{}` when it has one (the final answer of a
    solution that boxed an intermediate result first), else whatever math-verify finds."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    parse_timeout, _ = _timeouts()
    boxed = boxed_contents(text)
    if boxed:
        text = f"$\\boxed{{{boxed[-1]}}}$"
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(text, extraction_config=config, **parse_timeout)


def math_verify(prompts, completions, completion_ids=None, *, answer, **columns) -> list:
    """1 when the completion's final answer is mathematically equal to the reference, graded by
    the `math-verify` library: `\\boxed{}` first, then LaTeX and plain expressions; fractions,
    decimals, radicals, intervals, sets and percentages compare by value.

    **Arguments:**

    - `prompts`, `completion_ids`, `columns`: unused (TRL's signature).
    - `completions`: the completions.
    - `answer`: the references (LaTeX, `\\boxed{}` or plain; `$...$` is optional).

    **Returns:**

    1.0 / 0.0 per completion; `None` where the reference does not parse.
    """
    from math_verify import verify

    _, verify_timeout = _timeouts()
    out: list[float | None] = []
    for text, reference in zip(completion_texts(completions), answer, strict=True):
        gold = _parse_reference(str(reference))
        if not gold:
            out.append(None)
            continue
        out.append(float(verify(gold, _parse_completion(text), **verify_timeout)))
    return out


def _math_vote(text: str):
    parsed = _parse_completion(text)
    return str(parsed[-1]) if parsed else None


math_verify.vote_key = _math_vote
