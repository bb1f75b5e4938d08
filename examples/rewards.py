"""Reward functions for `configs/examples/dataset.toml`, written exactly as for TRL's
`GRPOTrainer`: they run unchanged under either."""

import re

_FINAL = re.compile(r"####\s*(-?\d+)\s*$")


def exact_match(prompts, completions, completion_ids, solution, **kwargs) -> list[float]:
    """1.0 when the completion's last line is `#### N` with N the `solution` column."""
    out = []
    for completion, reference in zip(completions, solution, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        match = _FINAL.search(text.strip())
        out.append(float(match is not None and match.group(1) == str(reference).strip()))
    return out


def shows_work(prompts, completions, completion_ids, **kwargs) -> list[float | None]:
    """1.0 when the completion writes at least one intermediate step (`a+b=c`); None (not
    applicable) for two-operand problems, which have nothing to show."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        operators = len(re.findall(r"[+-]", prompt))
        if operators < 2:
            out.append(None)
            continue
        out.append(float(len(re.findall(r"\d+[+-]\d+=\d+", completion)) >= operators))
    return out
