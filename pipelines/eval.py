"""Evaluate a model on GSM8K-style held-out problems, before or after training.

    python pipelines/eval.py CONFIG_OR_RUN_DIR [--split test] [--samples K] [section.key=value ...]

A config evaluates its `model.path` (e.g. the base model before any training); a run directory
evaluates its exported policy (`RUN/hf`) with the run's resolved config. Prints strict and
flexible greedy accuracy, pass@k and maj@k (with `--samples K > 1`), and writes every completion
to a JSONL file beside the run, whose path it prints: `RUN/eval/SPLIT_hf.jsonl` for a run
directory, `OUTPUT_DIR/eval/SPLIT_CONFIG.jsonl` for a config (its `run.output_dir`, default
`runs/CONFIG`), or `--output`.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import jax


def completions_path(target: Path, config, split: str) -> Path:
    """Where the completions go unless `--output` says: beside the run.

    **Arguments:**

    - `target`: the run directory or config file evaluated.
    - `config`: its resolved `gradflow.config.Config`.
    - `split`: `test` or `train`.

    **Returns:**

    `RUN/eval/SPLIT_hf.jsonl` for a run directory; for a config
    `run.output_dir/eval/SPLIT_CONFIG.jsonl`, `run.output_dir` defaulting to `runs/CONFIG`.
    """
    if target.is_dir():
        return target / "eval" / f"{split}_hf.jsonl"
    directory = Path(config.run.output_dir or Path("runs") / target.stem)
    return directory / "eval" / f"{split}_{target.stem}.jsonl"


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and evaluates.

    **Arguments:**

    - `argv`: arguments (default: `sys.argv[1:]`).

    **Returns:**

    The exit status.
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("target", help="a TOML config or a run directory")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--samples", type=int, default=0, help="k for pass@k / maj@k")
    parser.add_argument("--size", type=int, default=0, help="problems to evaluate (0: eval.size)")
    parser.add_argument(
        "--output",
        default="",
        help="completions JSONL (default: RUN/eval/SPLIT_hf.jsonl for a run directory, "
        "run.output_dir/eval/SPLIT_CONFIG.jsonl for a config, run.output_dir defaulting to "
        "runs/CONFIG)",
    )
    args = parser.parse_intermixed_args(argv)  # overrides before or after options

    from gradflow.config import ConfigError, load_config
    from gradflow.evaluate import evaluate, evaluation_turns
    from gradflow.models import load_hf
    from gradflow.tasks.errors import DataError
    from gradflow.tasks.task import build_task
    from gradflow.train import load_policy

    target = Path(args.target)
    try:
        run_dir = target if target.is_dir() else None
        config_path = target / "config.toml" if run_dir else target
        config = load_config(config_path, args.overrides)
        task = build_task(config)
        if run_dir is not None:
            if not (run_dir / "hf").is_dir():
                raise FileNotFoundError(f"{run_dir} has no exported policy (hf/): did it finish?")
            policy = load_hf(run_dir / "hf", dtype=config.model.dtype)
            compute = config.model.compute_dtype or config.model.dtype
            policy = dataclasses.replace(policy, compute_dtype=compute)
        else:
            policy = load_policy(config)
        problems = task.test if args.split == "test" else task.train
        bank = task.test_prompts if args.split == "test" else task.train_prompts
        size = min(args.size or config.eval.size, len(problems))
        samples = args.samples or config.eval.samples
        from gradflow.algorithms import hyperparameters

        max_new = config.algorithm.get(
            "max_new_tokens", hyperparameters(config.algorithm_name)["max_new_tokens"]
        )
        rows = problems.head(size)
        metrics, records = evaluate(
            policy,
            task,
            rows,
            bank.ids[:size],
            bank.mask[:size],
            key=jax.random.key(config.run.seed),
            max_new_tokens=max_new,
            batch_size=min(config.eval.batch_size, size),
            samples=samples,
            temperature=config.eval.temperature,
            turns=evaluation_turns(task, rows, config.environment),
        )
        task.close()
    except (ConfigError, DataError, FileNotFoundError, NotADirectoryError, ValueError) as error:
        if os.environ.get("GRADFLOW_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else completions_path(target, config, args.split)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, value in metrics.items():
        print(f"{name:28s} {value:.4f}")
    print(f"completions: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
