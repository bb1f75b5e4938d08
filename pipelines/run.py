"""Train a policy with RL: `python pipelines/run.py configs/grpo.toml [section.key=value ...]`.

`--print-config` prints the resolved TOML and exits. User errors (bad config, missing files,
unwritable output) end with a one-line message and a non-zero exit status, no traceback
(`GRADFLOW_DEBUG=1` shows it). Ctrl-C saves a checkpoint and exits with status 130.

Several processes (hosts) train together through `jax.distributed`, set up before any JAX work
from flags or the environment (docs/scaling.md):

- `--coordinator HOST:PORT --num-processes N --process-id I` (or `GRADFLOW_COORDINATOR`,
  `GRADFLOW_NUM_PROCESSES`, `GRADFLOW_PROCESS_ID`): explicit;
- `--distributed` (or `GRADFLOW_DISTRIBUTED=1`): JAX's own detection (TPU pod slices, SLURM,
  Open MPI).
"""

import argparse
import os
import sys
from pathlib import Path

from gradflow.checkpoint import CheckpointWriteError
from gradflow.config import ConfigError, load_config
from gradflow.tasks.errors import DataError


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer") from None


def init_distributed(args: argparse.Namespace) -> None:
    """Calls `jax.distributed.initialize` when flags or the environment ask for it.

    **Arguments:**

    - `args`: the parsed command line (`coordinator`, `num_processes`, `process_id`,
      `distributed`).

    **Returns:**

    Nothing.
    """
    coordinator = args.coordinator or os.environ.get("GRADFLOW_COORDINATOR") or None
    num_processes = args.num_processes
    if num_processes is None:
        num_processes = _env_int("GRADFLOW_NUM_PROCESSES")
    process_id = args.process_id
    if process_id is None:
        process_id = _env_int("GRADFLOW_PROCESS_ID")
    auto = args.distributed or os.environ.get("GRADFLOW_DISTRIBUTED", "") not in ("", "0")
    explicit = (coordinator, num_processes, process_id)
    if not auto and all(v is None for v in explicit):
        return
    if not auto and any(v is None for v in explicit):
        raise ConfigError(
            "multi-process training needs all of --coordinator/GRADFLOW_COORDINATOR, "
            "--num-processes/GRADFLOW_NUM_PROCESSES and --process-id/GRADFLOW_PROCESS_ID "
            "(or --distributed / GRADFLOW_DISTRIBUTED=1 for JAX's own detection)"
        )
    import jax

    # CPU processes exchange data with gloo (GPU and TPU backends ignore this setting).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


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
    group = parser.add_argument_group("multi-process (multi-host) training")
    group.add_argument("--coordinator", help="HOST:PORT of process 0 (GRADFLOW_COORDINATOR)")
    group.add_argument(
        "--num-processes", type=int, help="number of processes (GRADFLOW_NUM_PROCESSES)"
    )
    group.add_argument("--process-id", type=int, help="this process, 0..N-1 (GRADFLOW_PROCESS_ID)")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="let JAX detect the cluster: TPU pod slice, SLURM, ... (GRADFLOW_DISTRIBUTED=1)",
    )
    args = parser.parse_intermixed_args(argv)  # overrides before or after options
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(config.to_toml(), end="")
            return 0
        init_distributed(args)
        from gradflow.resume import AlreadyFinished, ResumeError
        from gradflow.train import TrainingError, train

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
    except (TrainingError, ResumeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        from gradflow.memory import out_of_memory_message

        message = out_of_memory_message(error)
        if message is None or os.environ.get("GRADFLOW_DEBUG"):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    import jax

    if jax.process_index() == 0:
        summary = ", ".join(f"{k}={v:.3f}" for k, v in final.items())
        print(f"done: {run_dir} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
