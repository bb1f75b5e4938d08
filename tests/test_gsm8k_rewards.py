"""GSM8K answer extraction and grading: hand-written cases, the whole test split, fuzzing."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradflow.evaluate import majority_score
from gradflow.rewards import (
    extract_answer,
    format_ok,
    gsm8k_strict,
    is_correct,
    normalize_number,
    reference_answer,
)
from gradflow.tasks.gsm8k import load_gsm8k

# (text, strict, flexible)
EXTRACTION_CASES = [
    ("#### 18", "18", "18"),
    ("She makes 9 * 2 = $18.\n#### 18", "18", "18"),
    ("####18", "18", "18"),
    ("#### 1,234", "1234", "1234"),
    ("#### 1,234,567", "1234567", "1234567"),
    ("#### $18", "18", "18"),
    ("#### $18.00", "18", "18"),
    ("#### 18.50", "18.5", "18.5"),
    ("#### 0.250", "0.25", "0.25"),
    ("#### 18.", "18", "18"),
    ("#### 18 dollars", "18", "18"),
    ("#### 45%", "45", "45"),
    ("#### +5", "5", "5"),
    ("#### -3", "-3", "-3"),
    ("#### -0", "0", "0"),
    ("#### 3/4", "3/4", "3/4"),
    ("#### **42**", "42", "42"),
    # the last `####` wins in both modes
    ("#### 7\nwait, I made a mistake\n#### 8", "8", "8"),
    # a last `####` without a number gives nothing in strict mode
    ("#### 7\n#### eighteen", None, "7"),
    ("#### eighteen", None, None),
    # `####` first, before any other format
    ("\\boxed{3}\nThe answer is 4.\n#### 5", "5", "5"),
    # \boxed{}
    ("So the total is \\boxed{18}.", None, "18"),
    ("\\boxed{1,000}", None, "1000"),
    ("\\boxed{\\$18.00}", None, "18"),
    ("\\boxed{50\\%}", None, "50"),
    ("\\boxed{1{,}000}", None, "1000"),
    ("\\boxed{\\frac{3}{4}}", None, "3/4"),
    ("\\boxed{18 \\text{ apples}}", None, "18"),
    ("first \\boxed{2}, then \\boxed{3}", None, "3"),
    ("$\\boxed{-7}$", None, "-7"),
    ("\\boxed{} then 9", None, "9"),
    # <answer> tags
    ("<answer>18</answer>", None, "18"),
    ("<answer> $1,200 </answer> and 5 more", None, "1200"),
    ("<ANSWER>7</ANSWER>", None, "7"),
    ("<answer>18</answer> ... <answer>19</answer>", None, "19"),
    # "the answer is N" / "final answer: N"
    ("The answer is 18.", None, "18"),
    ("so THE ANSWER IS $1,234.56 in total, from 3 boxes", None, "1234.56"),
    ("Final answer: 42 apples. (7 * 6)", None, "42"),
    ("**Final Answer:** 42", None, "42"),
    ("The final answer is: -12", None, "-12"),
    ("the answer is 3, not 4; the answer is 5 per 2 days", None, "5"),
    ("The answer is correct: 12 + 3 = 15", None, "15"),
    # boxed before answer tags before "the answer is"
    ("The answer is 1. <answer>2</answer> \\boxed{3}", None, "3"),
    ("The answer is 1. <answer>2</answer>", None, "2"),
    # fallback: the last number anywhere
    ("3 apples + 4 apples = 7 apples", None, "7"),
    ("She had 1,000 marbles and gave away 250.", None, "250"),
    ("The result is 5-3 = 2", None, "2"),
    ("Temperature dropped to -3 degrees", None, "-3"),
    ("It costs $18.00.", None, "18"),
    ("That is 25% of the class", None, "25"),
    ("Half is .5", None, "0.5"),
    ("The ratio is 3/4", None, "3/4"),
    ("5 - 3", None, "3"),
    ("no number here", None, None),
    ("", None, None),
    ("####", None, None),
]


@pytest.mark.parametrize(("text", "strict", "flexible"), EXTRACTION_CASES)
def test_extract_answer(text, strict, flexible):
    assert extract_answer(text, mode="strict") == strict
    assert extract_answer(text, mode="flexible") == flexible
    assert extract_answer(text) == flexible


def test_extract_answer_rejects_unknown_mode():
    with pytest.raises(ValueError, match="strict, flexible"):
        extract_answer("#### 1", mode="lenient")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18", "18"),
        ("18.00", "18"),
        ("18.50", "18.5"),
        ("0.0", "0"),
        ("-0.50", "-0.5"),
        ("1,234", "1234"),
        ("1,234,567.890", "1234567.89"),
        ("$1,234.50 per hour.", "1234.5"),
        ("+7", "7"),
        ("-3", "-3"),
        ("\u22123", "-3"),
        ("50%", "50"),
        ("12 eggs.", "12"),
        ("3/4", "3/4"),
        ("3 / 4", "3/4"),
        ("\\frac{3}{4}", "3/4"),
        ("  42  ", "42"),
        ("10000000000000000000000000000000000000001", "10000000000000000000000000000000000000001"),
        ("0.1000000000000000000000000000000000001", "0.1000000000000000000000000000000000001"),
        ("abc", None),
        ("", None),
        ("5 hours 30 minutes", None),
        ("3^2", None),
        ("1/0", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
        ("#### 1,200", "1200"),
        ("Loss of 7.\n#### -7", "-7"),
        ("1,234", "1234"),
        ("18.0", "18"),
        ("0.5", "0.5"),
    ],
)
def test_reference_answer(reference, expected):
    assert reference_answer(reference) == expected


@pytest.mark.parametrize("reference", ["", "no number", "#### none", "5 and 6"])
def test_reference_answer_rejects_references_without_a_number(reference):
    with pytest.raises(ValueError, match="no reference number"):
        reference_answer(reference)


@pytest.mark.parametrize(
    ("completion", "reference", "strict", "flexible"),
    [
        ("#### 18", "#### 18", True, True),
        ("#### 18.00", "18", True, True),
        ("#### $1,200", "#### 1,200", True, True),
        ("#### -7", "#### -7", True, True),
        ("#### 7", "#### -7", False, False),
        ("#### 0.75", "3/4", True, True),
        ("The answer is 3/4", "0.75", False, True),
        ("\\boxed{18}", "#### 18", False, True),
        ("The answer is 18.", "#### 18", False, True),
        ("so 18", "#### 18", False, True),
        ("#### 19", "#### 18", False, False),
        ("#### 18.5", "#### 18", False, False),
        ("#### 180", "#### 18", False, False),
        ("#### 1.8", "#### 18", False, False),
        ("The answer is 18, or \\boxed{19}", "#### 18", False, False),
        ("#### 18\n#### 19", "#### 18", False, False),
        ("18 is wrong, it is 19", "#### 18", False, False),
        ("", "#### 18", False, False),
        ("no number", "#### 18", False, False),
    ],
)
def test_is_correct(completion, reference, strict, flexible):
    assert is_correct(completion, reference, mode="strict") is strict
    assert is_correct(completion, reference, mode="flexible") is flexible


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        ("step 1\n#### 18", True),
        ("#### 1,234", True),
        ("#### $18.", True),
        ("  #### -3 apples  \nthanks", True),
        ("#### 18.00", True),
        ("#### eighteen", False),
        ("#### 3 + 4", False),
        ("The answer #### 18", False),
        ("####", False),
        ("\\boxed{18}", False),
        ("", False),
    ],
)
def test_format_ok(completion, ok):
    assert format_ok(completion) is ok


@pytest.fixture(scope="module")
def gsm8k_test():
    return load_gsm8k("test")


def test_every_test_answer_grades_itself_correct(gsm8k_test):
    for problem in gsm8k_test:
        assert is_correct(problem.answer, problem.answer, mode="strict"), problem.answer
        assert is_correct(problem.answer, problem.answer, mode="flexible"), problem.answer
        assert format_ok(problem.answer), problem.answer


def test_test_answers_plus_one_grade_wrong(gsm8k_test):
    for problem in random.Random(0).sample(gsm8k_test, 200):
        body, _, final = problem.answer.rpartition("####")
        # An independent read of the final number: digits, commas and an optional minus sign.
        number = int(re.fullmatch(r"\s*(-?[\d,]+)\s*", final)[1].replace(",", ""))
        wrong = f"{body}#### {number + 1}"
        assert not is_correct(wrong, problem.answer, mode="strict"), wrong
        assert not is_correct(wrong, problem.answer, mode="flexible"), wrong
        assert is_correct(f"{body}#### {number}", problem.answer, mode="strict")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**12), max_value=10**12), st.sampled_from(["", "$"]))
def test_thousands_separated_integers_round_trip(n, currency):
    sign = "-" if n < 0 else ""
    text = f"The total is {sign}{currency}{abs(n):,}."
    assert extract_answer(f"#### {sign}{currency}{abs(n):,}", mode="strict") == str(n)
    assert extract_answer(text) == str(n)
    assert is_correct(text, f"#### {n}")
    assert not is_correct(text, f"#### {n + 1}")


_FUZZ_ALPHABET = list("0123456789.,$%-+/#{}\\ <>answerboxdfrc:\n")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(_FUZZ_ALPHABET), max_size=60))
def test_extraction_never_raises(text):
    for mode in ("strict", "flexible"):
        answer = extract_answer(text, mode=mode)
        assert answer is None or normalize_number(answer) == answer
    assert isinstance(format_ok(text), bool)
    assert isinstance(is_correct(text, "#### 5"), bool)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["#### 1", "#### 3/4", "#### 0.75"], True),  # 3/4 and 0.75 are one value: 2 votes
        (["#### 1", "#### 1", "#### 0.75"], False),
        (["#### 0.75", "#### 1"], True),  # a tie goes to the answer seen first
        (["#### 1", "#### 0.75"], False),
        (["no answer", "nothing"], False),
    ],
)
def test_majority_vote_counts_answers_by_value(texts, expected):
    scores = gsm8k_strict(None, texts, answer=["so it is\n#### 0.75"] * len(texts))
    assert majority_score(texts, scores, gsm8k_strict.vote_key) == float(expected)
