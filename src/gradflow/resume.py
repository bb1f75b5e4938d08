"""Resuming a run, in one place: whether a directory may be (re)used, which checkpoint a run
continues from, and whether the config still describes the same run.

`plan(config, run_dir)` reads the run directory and the latest checkpoint's manifest once and
returns a `Resume`; the loop restores its state and tells the logger where to cut the logs. The
data order depends only on the seed and the step (`train.prompt_indices`), so the step is all a
checkpoint needs to say about where the data stood.
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from .checkpoint import list_checkpoints, read_manifest
from .config import Config, ConfigError, load_config

# What a resumed run may change: how long it trains, what it logs and evaluates, and its mesh.
RESUMABLE_CHANGES = (
    "run.resume",
    "run.output_dir",
    "run.compilation_cache",
    "train.steps",
    "eval.",
    "checkpoint.",
    "logging.",
    "mesh.",
)


class AlreadyFinished(Exception):
    """Resuming a run that has already done all its steps."""


class ResumeError(RuntimeError):
    """The processes of a multi-process run disagree about the run directory."""


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a run starts.

    **Arguments:**

    - `checkpoint`: the checkpoint to restore, or `None` for a fresh start.
    - `step`: the steps already done (0 for a fresh start).
    """

    checkpoint: Path | None
    step: int

    @property
    def resumed(self) -> bool:
        """Whether the run continues from a checkpoint."""
        return self.checkpoint is not None


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not (prefix == "model." and key == "overrides"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_same_run(config: Config, saved: Path) -> None:
    """Raises unless `config` continues the run whose resolved config is `saved`: anything
    that shapes the training trajectory (model, task, algorithm, seed, batch) must be unchanged."""
    if not saved.is_file():
        return
    before = _flat(load_config(saved).to_dict())
    now = _flat(config.to_dict())
    changed = [
        f"{key} {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"run.resume: the run in {saved.parent} was started with a different config "
            f"({', '.join(changed[:3])}{more}); resume it with the config it was started with "
            "(only train.steps, [eval], [checkpoint], [logging] and [mesh] may change), or "
            "start a new run.output_dir"
        )


def _same_on_every_process(value: int, what: str) -> None:
    """Raises on every process unless they all hold the same `value` (e.g. the step a resume
    starts at)."""
    if jax.process_count() == 1:
        return
    values = np.asarray(multihost_utils.process_allgather(np.int64(value))).ravel()
    if (values != values[0]).any():
        raise ResumeError(
            f"process {jax.process_index()} found {what} {value}, process 0 found "
            f"{int(values[0])}: run.output_dir must be on a file system every host sees"
        )


def plan(config: Config, run_dir: Path) -> Resume:
    """Decides where a run starts, before anything is written.

    **Arguments:**

    - `config`: the run config.
    - `run_dir`: the run directory.

    **Returns:**

    The `Resume`: the latest checkpoint and its step with `run.resume`, else a fresh start.

    **Raises:**

    `ConfigError` for a fresh run in a directory that holds one, or a resume with another
    config; `AlreadyFinished` when the run has done all its steps; `ResumeError` when processes
    see different checkpoints.
    """
    found = list_checkpoints(run_dir / "checkpoints")
    if not config.run.resume:
        if found or (run_dir / "metrics.jsonl").exists():
            raise ConfigError(
                f"{run_dir} already holds a run: pass run.resume=true to continue it, or "
                "another run.output_dir"
            )
        resume = Resume(checkpoint=None, step=0)
    elif not found:
        resume = Resume(checkpoint=None, step=0)
    else:
        _check_same_run(config, run_dir / "config.toml")
        resume = Resume(checkpoint=found[-1], step=int(read_manifest(found[-1])["step"]))
    if config.run.resume:
        _same_on_every_process(resume.step, "a latest checkpoint at step")
        if resume.step >= config.train.steps:
            raise AlreadyFinished(
                f"{run_dir} already finished {resume.step} of {config.train.steps} steps; "
                "nothing to do"
            )
    if jax.process_count() > 1:  # every process checked the directory before any writes it
        multihost_utils.sync_global_devices("gradflow: run directory checked")
    return resume
