"""Supervised fine-tuning of the embedded default base model (see `gradflow.sft`).

Usage (from the repository root):

    python pipelines/sft.py configs/toy_sft.toml [section.key=value ...]

User errors (a bad config or override, a missing file) print one line and exit with status 2.
"""

import argparse
import shlex
import sys

from gradflow.config import ConfigError
from gradflow.sft import load_sft_config, run_sft


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, runs SFT and prints progress.

    **Arguments:**

    - `argv`: the arguments (default: `sys.argv[1:]`).

    **Returns:**

    The exit status: 0 on success, 2 on a user error.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="the SFT TOML config, e.g. configs/toy_sft.toml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)  # overrides before or after options
    command = shlex.join(["python", "pipelines/sft.py", args.config, *args.overrides])
    try:
        config = load_sft_config(args.config, args.overrides)
        output = run_sft(config, log=lambda line: print(line, flush=True), command=command)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
