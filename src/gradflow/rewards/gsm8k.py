"""GSM8K answer extraction and grading (strict `#### N` and flexible matching).

Model output is only ever parsed with regular expressions and `decimal.Decimal`; it is never
evaluated.
"""

import re
from decimal import Decimal
from fractions import Fraction

MODES = ("strict", "flexible")

# A number: an optional sign (only when not glued to a preceding word or number, so `5-3` is
# `5` then `3`), an optional currency sign, digits with optional thousands separators and
# decimals (or a bare `.5`), and an optional `/denominator`.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.)\]}])[-+\u2212])?"
    r"(?:\\?\$\s?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<!\d)\.\d+)"
    r"(?:\s?/\s?(?P<den>\d+))?"
)
# What may precede a number that starts a fragment: spaces, markdown emphasis, `:`/`=`, LaTeX
# math delimiters and opening brackets.
_PREFIX = re.compile(r"[\s*_:=$({\[]*(?:\\[(\[]\s*)?")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_HASHES = "####"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(r"\b(?:final\s+)?answer\b[*_\s]*(?:is\b[*_\s]*:?|:)", re.IGNORECASE)
_DIGIT = re.compile(r"\d")


def _clean(fragment: str) -> str:
    """Rewrite LaTeX number notation as plain text: `\\frac{a}{b}` -> `a/b`, `1{,}000` -> `1,000`,
    `1\\,000` -> `1000`, `\\%` -> `%`."""
    fragment = _LATEX_FRAC.sub(r"\1/\2", fragment)
    return fragment.replace("{,}", ",").replace("\\,", "").replace("\\%", "%")


def _format_match(match: re.Match[str]) -> str | None:
    """Normalised string of a `_NUMBER` match, or `None` for a zero denominator."""
    negative = match["sign"] in ("-", "\u2212")
    value = Decimal(match["num"].replace(",", ""))
    if value == value.to_integral_value():
        text = format(value.to_integral_value(), "f")
    else:
        text = format(value, "f").rstrip("0").rstrip(".")
    den = match["den"]
    if den is not None:
        if int(den) == 0:
            return None
        text = f"{text}/{den.lstrip('0')}"
    if negative and value != 0:
        text = "-" + text
    return text


def _leading_number(fragment: str) -> str | None:
    """Normalised number at the start of `fragment` (after spaces, `$`, `*`, `:`, brackets),
    ignoring whatever follows it."""
    fragment = _clean(fragment)
    start = _PREFIX.match(fragment).end()
    match = _NUMBER.match(fragment, start)
    return None if match is None else _format_match(match)


def normalize_number(s: str) -> str | None:
    """Normalise a string holding one number, possibly with currency, units and punctuation.

    Thousands separators, `$`, `%`, a leading `+`, trailing units or words and a trailing period
    are dropped; decimals that equal integers become integers (`18.00` -> `18`, `18.50` ->
    `18.5`); negatives keep their sign; fractions stay fractions (`3/4`, `\\frac{3}{4}` -> `3/4`).

    **Arguments:**

    - `s`: the text, e.g. `"$1,234.50 per hour."`.

    **Returns:**

    The normalised number (`"1234.5"`), or `None` when `s` does not start with a number or holds
    more than one (`"5 hours 30 minutes"`, `"3^2"`).
    """
    s = _clean(s)
    start = _PREFIX.match(s).end()
    match = _NUMBER.match(s, start)
    if match is None or _DIGIT.search(s, match.end()):
        return None
    return _format_match(match)


def _after_last_hashes(text: str) -> str | None:
    """The number right after the last `####` (strict GSM8K format), or `None`."""
    index = text.rfind(_HASHES)
    if index < 0:
        return None
    line = text[index + len(_HASHES) :].split("\n", 1)[0]
    return _leading_number(line)


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` (and `\\fbox{...}`), nested braces matched.

    **Arguments:**

    - `text`: a completion.

    **Returns:**

    The contents, in order.
    """
    contents = []
    for match in _BOXED.finditer(text):
        depth = 1
        for i in range(match.end(), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    contents.append(text[match.end() : i])
                    break
    return contents


def _last_parsed(fragments: list[str]) -> str | None:
    """The number leading the last fragment that starts with one."""
    for fragment in reversed(fragments):
        number = _leading_number(fragment)
        if number is not None:
            return number
    return None


def extract_answer(text: str, *, mode: str = "flexible") -> str | None:
    """Extract the final numeric answer from a completion.

    - `"strict"`: only the number right after the last `####` counts.
    - `"flexible"`: the first of these that gives a number: the last `#### N`; the last
        `\\boxed{N}`; the last `<answer>N</answer>`; the last "the answer is N" / "final answer: N"
        (case-insensitive); finally the last number anywhere in the text.

    **Arguments:**

    - `text`: the model's completion.
    - `mode`: `"strict"` or `"flexible"`.

    **Returns:**

    The answer normalised by the rules of `normalize_number`, or `None` when there is none.
    """
    if mode not in MODES:
        raise ValueError(f"unknown extraction mode {mode!r}; valid modes: {', '.join(MODES)}")
    answer = _after_last_hashes(text)
    if answer is not None or mode == "strict":
        return answer
    for fragments in (
        boxed_contents(text),
        _ANSWER_TAG.findall(text),
        [text[m.end() : m.end() + 100] for m in _ANSWER_IS.finditer(text)],
    ):
        answer = _last_parsed(fragments)
        if answer is not None:
            return answer
    numbers = [_format_match(m) for m in _NUMBER.finditer(_clean(text))]
    numbers = [n for n in numbers if n is not None]
    return numbers[-1] if numbers else None


def reference_answer(reference: str) -> str:
    """The normalised reference number of a GSM8K `answer` field or of a bare number.

    **Arguments:**

    - `reference`: a solution ending in `#### N` (the number after the last `####` is taken), or
        a bare number such as `"1,234"`.

    **Returns:**

    The normalised number.

    **Raises:**

    `ValueError` when no number can be read from `reference`.
    """
    if _HASHES in reference:
        answer = _after_last_hashes(reference)
    else:
        answer = normalize_number(reference)
    if answer is None:
        raise ValueError(f"no reference number in {reference[-200:]!r}")
    return answer


def answer_value(number: str) -> Fraction:
    """Exact value of a normalised number (`"18.5"`, `"-3/4"`).

    **Arguments:**

    - `number`: a number as `extract_answer` or `reference_answer` returns it.

    **Returns:**

    Its value as a `Fraction`.
    """
    num, _, den = number.partition("/")
    value = Fraction(Decimal(num))
    return value / int(den) if den else value


def is_correct(completion: str, reference: str, *, mode: str = "flexible") -> bool:
    """Whether the answer extracted from a completion equals the reference.

    Numbers are compared by exact value, so `3/4` equals `0.75` and `18.00` equals `18`.

    **Arguments:**

    - `completion`: the model's completion.
    - `reference`: the GSM8K `answer` field (ending in `#### N`) or a bare number.
    - `mode`: extraction mode for the completion, `"strict"` or `"flexible"`.

    **Returns:**

    `True` when an answer was extracted and has the reference's value.
    """
    expected = reference_answer(reference)
    answer = extract_answer(completion, mode=mode)
    return answer is not None and answer_value(answer) == answer_value(expected)


def format_ok(completion: str) -> bool:
    """Whether the completion has a well-formed `#### N` line (for a format reward).

    **Arguments:**

    - `completion`: the model's completion.

    **Returns:**

    `True` when some line is `####` followed by one number (units and a period allowed), e.g.
    `#### 1,234` or `#### $18.`; `False` for `#### eighteen` or `#### 3 + 4`.
    """
    for line in completion.splitlines():
        line = line.strip()
        if line.startswith(_HASHES) and normalize_number(line[len(_HASHES) :]) is not None:
            return True
    return False
