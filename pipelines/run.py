"""Train a policy with RL: `python pipelines/run.py configs/grpo.toml [section.key=value ...]`.

`--print-config` prints the resolved TOML and exits. User errors (bad config, missing files,
unwritable output) end with a one-line message and a non-zero exit status, no traceback
(`GRADFLOW_DEBUG=1` shows it).
"""

import argparse
import os
import sys
from pathlib import Path

from gradflow.checkpoint import CheckpointWriteError
from gradflow.config import ConfigError, load_config
from gradflow.data import DataError


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs training.

    **Arguments:**

    - `argv`: arguments (default: `sys.argv[1:]`).

    **Returns:**

    The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="a TOML config, e.g. configs/grpo.toml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(config.to_toml(), end="")
            return 0
        from gradflow.train import AlreadyFinished, TrainingError, train

        try:
            run_dir, final = train(config, config_name=Path(args.config).stem)
        except AlreadyFinished as done:
            print(done)
            return 0
    except (
        ConfigError,
        DataError,
        FileNotFoundError,
        NotADirectoryError,
        ValueError,
        CheckpointWriteError,
        PermissionError,
    ) as error:
        if os.environ.get("GRADFLOW_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    summary = ", ".join(f"{k}={v:.3f}" for k, v in final.items())
    print(f"done: {run_dir} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
