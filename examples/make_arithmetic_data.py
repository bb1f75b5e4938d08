"""Writes `examples/data/arithmetic_{train,test}.jsonl`: the embedded arithmetic task in a schema
of its own (`{"problem": ..., "solution": ...}`), the data of `configs/examples/dataset.toml`.

`python examples/make_arithmetic_data.py` rewrites them (the same rows every time).
"""

import json
from pathlib import Path

from gradflow.tasks.arithmetic import ArithmeticTask, generate, solve, task_prompt

HERE = Path(__file__).parent / "data"


def main() -> None:
    """Writes the two files."""
    HERE.mkdir(exist_ok=True)
    for split, size, seed in (("train", 4000, 0), ("test", 500, 1)):
        problems = generate(ArithmeticTask(), size, seed=seed, split=split)
        with open(HERE / f"arithmetic_{split}.jsonl", "w") as handle:
            for p in problems:
                row = {"problem": task_prompt(p.question), "solution": str(solve(p.question))}
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
